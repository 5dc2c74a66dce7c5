"""KVCacheManager with no model: block accounting, prefix hits, LRU eviction, reset."""

from __future__ import annotations

from zllm.core.kv_cache_manager import KVCacheManager, block_hash
from zllm.core.request import Request
from zllm.protocol.sampling_params import SamplingParams

BS = 4


def make_request(key: str, tokens: list[int], extra: bytes = b"", **params) -> Request:
    return Request(
        key=key,
        client=b"c",
        request_id=key,
        prompt_token_ids=list(tokens),
        sampling_params=SamplingParams(max_tokens=8, **params),
        eos_token_ids=[],
        max_model_len=1024,
        extra_hash_key=extra,
    )


def admit(kv: KVCacheManager, request: Request) -> int:
    """Admit the whole prompt the way the scheduler does; return the prefix-hit tokens."""
    hits, num_cached = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, request.num_tokens - num_cached, hits)
    kv.record_lookup(request, num_cached)
    request.num_computed_tokens = request.num_tokens
    return num_cached


def test_allocate_and_free_return_every_block() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", range(10))  # 3 blocks, the last one partial
    admit(kv, a)
    assert len(kv.block_ids(a)) == 3 and kv.num_used_blocks == 3 and kv.num_free_blocks == 5
    assert kv.allocate_slots(a, 2)  # 12 tokens: still 3 blocks
    assert len(kv.block_ids(a)) == 3
    a.num_computed_tokens = 12
    assert kv.allocate_slots(a, 1)  # 13 tokens: a 4th block
    assert len(kv.block_ids(a)) == 4
    kv.free(a)
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == 8 and kv.block_ids(a) == []


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", range(8))
    admit(kv, a)
    assert not kv.allocate_slots(a, 5)  # needs 4 blocks, pool has 3
    assert len(kv.block_ids(a)) == 2 and kv.num_free_blocks == 1


def test_leading_full_blocks_are_shared_and_refcounted() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(kv, a)
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 42, 43])
    assert admit(kv, b) == 8
    shared = kv.block_ids(a)[:2]
    assert kv.block_ids(b)[:2] == shared
    assert kv.block_ids(b)[2] != kv.block_ids(a)[2]
    assert [kv.blocks[i].ref_count for i in shared] == [2, 2]
    kv.free(a)
    assert [kv.blocks[i].ref_count for i in shared] == [1, 1]
    assert all(i not in kv.free_queue for i in shared)
    kv.free(b)
    assert kv.num_used_blocks == 0
    assert (kv.prefix_queries, kv.prefix_hits) == (19, 8)


def test_freed_blocks_stay_cached_until_evicted() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", range(9))
    admit(kv, a)
    kv.free(a)
    b = make_request("b", list(range(9)) + [99])
    assert admit(kv, b) == 8


def test_at_least_one_token_is_left_to_compute() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", range(8))
    admit(kv, a)
    kv.free(a)
    same = make_request("same", range(8))  # fully cached, but the last block is recomputed
    hits, num_cached = kv.get_computed_blocks(same)
    assert num_cached == 4 and len(hits) == 1


def test_hash_is_chained_and_keyed_by_extra() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    admit(kv, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # The same second block after a different first block is a different block.
    assert kv.get_computed_blocks(make_request("b", [0, 0, 0, 0, 5, 6, 7, 8, 9]))[1] == 0
    # The same tokens under another adapter (extra key) share nothing.
    assert kv.get_computed_blocks(make_request("c", range(1, 10), extra=b"lora-1"))[1] == 0
    assert block_hash(b"", [1, 2]) != block_hash(b"", [1, 2], b"x")


def test_prompt_logprobs_requests_read_nothing_from_the_cache() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    admit(kv, make_request("a", range(9)))
    assert kv.get_computed_blocks(make_request("b", range(9), prompt_logprobs=1)) == ([], 0)


def test_eviction_is_least_recently_freed_and_uncached_blocks_go_first() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_request("a", [1] * 8 + [7])  # 2 cached blocks + 1 partial
    b = make_request("b", [2] * 8)  # 2 cached blocks
    admit(kv, a)
    admit(kv, b)
    kv.free(a)
    kv.free(b)
    # 3 new blocks: the two that cache nothing (a's partial one, one never used), then the
    # tail of the least recently freed request.
    admit(kv, make_request("c", [3] * 12))
    assert kv.get_computed_blocks(make_request("a2", [1] * 8 + [7]))[1] == 4
    assert kv.get_computed_blocks(make_request("b2", [2] * 8 + [7]))[1] == 8


def test_cached_free_blocks_are_not_counted_twice() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", range(8))
    admit(kv, a)
    kv.free(a)  # 3 free blocks, 2 of them cached
    b = make_request("b", list(range(8)) + list(range(100, 108)))
    hits, num_cached = kv.get_computed_blocks(b)
    assert num_cached == 8
    # 2 hits + 2 new blocks: the pool has one block that is neither.
    assert not kv.allocate_slots(b, 8, hits)
    assert kv.num_free_blocks == 3 and kv.block_ids(b) == []
    assert kv.allocate_slots(b, 4, hits)
    assert kv.num_free_blocks == 0


def test_reset_prefix_cache_is_refused_while_blocks_are_in_use() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", range(9))
    admit(kv, a)
    assert kv.reset_prefix_cache() is False
    kv.free(a)
    assert kv.reset_prefix_cache() is True
    assert kv.cached == {} and all(b.hash is None for b in kv.blocks)
    assert kv.get_computed_blocks(make_request("b", range(9)))[1] == 0
    assert kv.prefix_queries == 9  # counters are cumulative


def test_prefix_caching_off_shares_and_counts_nothing() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    admit(kv, make_request("a", range(9)))
    assert admit(kv, make_request("b", range(9))) == 0
    assert kv.num_used_blocks == 6 and kv.cached == {}
    assert (kv.prefix_queries, kv.prefix_hits) == (0, 0)
