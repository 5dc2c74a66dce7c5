"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, prefix caching, LRU eviction.

Only ids live here; the tensors live in the workers. A full block is named by a hash
chained over the token ids of every block before it, so two requests that share a
prefix share its blocks. Freed blocks keep their hash and stay findable until they are
reused for something else, least-recently-freed first.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from zllm.core.request import Request


def block_hash(parent: bytes, token_ids: list[int], extra: bytes = b"") -> bytes:
    """Identity of a full block: its tokens, everything before it, and anything else that
    changes its KV (`extra`, e.g. a LoRA id)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    h.update(extra)
    return h.digest()


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # ref_count == 0 blocks; the first is evicted first.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.req_blocks: dict[str, list[int]] = {}
        self.req_hashes: dict[str, list[bytes]] = {}  # chained hashes of the request's full blocks
        self.req_num_cached: dict[str, int] = {}  # leading blocks of the request already registered
        # The most tokens a request may have with nothing to do here: its blocks' capacity, or
        # one short of filling the next block it is to register (`_tokens_placed`).
        self.req_room: dict[str, int] = {}
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_ids(self, request: Request) -> list[int]:
        return self.req_blocks.get(request.key, [])

    def _hashes(self, request: Request) -> list[bytes]:
        """Hashes of every full block of the request's known tokens (extended lazily)."""
        hashes = self.req_hashes.setdefault(request.key, [])
        bs = self.block_size
        while (len(hashes) + 1) * bs <= request.num_tokens:
            i = len(hashes)
            parent = hashes[-1] if hashes else b""
            tokens = request.token_ids[i * bs : (i + 1) * bs]
            hashes.append(block_hash(parent, tokens, request.extra_hash_key))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Leading cached blocks for a request about to be admitted, and how many tokens they hold.

        At least one token is always left to compute, so the model produces logits. A request
        that needs the hidden state of every position (prompt logprobs, mean pooling) or whose
        attention is bidirectional (an encoder) reads nothing from the cache.
        """
        if not self.enable_prefix_caching or not request.reads_prefix_cache:
            return [], 0
        hashes = self._hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for h in hashes[:max_blocks]:
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits, len(hits) * self.block_size

    def record_lookup(self, request: Request, num_cached_tokens: int) -> None:
        """Count one admission's prefix-cache lookup (tokens asked for, tokens found); the
        cache does not apply to bidirectional attention, so those requests count nothing."""
        if self.enable_prefix_caching and request.writes_prefix_cache:
            self.prefix_queries += request.num_tokens
            self.prefix_hits += num_cached_tokens

    # ---- mutations -----------------------------------------------------------------------

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[int] | None = None
    ) -> bool:
        """Make room for `num_new_tokens` more tokens of `request`; False (nothing changed) if
        the pool cannot hold them."""
        if not computed_blocks:  # a running request: most steps fit the blocks it holds
            num_tokens = request.num_computed_tokens + num_new_tokens
            if num_tokens <= self.req_room.get(request.key, -1):
                return True  # and fill no block to register: most decode steps
            owned = self.req_blocks.get(request.key)
            if owned is not None and num_tokens <= len(owned) * self.block_size:
                self._tokens_placed(request, num_tokens)  # no new block: one to register
                return True
        computed_blocks = computed_blocks or []
        owned = self.req_blocks.get(request.key, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = self.blocks_needed(num_computed + num_new_tokens)
        num_new_blocks = total - len(owned) - len(computed_blocks)
        # Cached blocks about to be taken from the free queue do not count as free.
        evictable = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        if num_new_blocks > self.num_free_blocks - evictable:
            return False
        owned = self.req_blocks.setdefault(request.key, [])
        for block_id in computed_blocks:
            self._touch(block_id)
            owned.append(block_id)
        for _ in range(max(num_new_blocks, 0)):
            owned.append(self._take_free_block())
        self._tokens_placed(request, num_computed + num_new_tokens)
        return True

    def free(self, request: Request) -> None:
        """Release a request's blocks. Eviction order: blocks holding no cached prefix first,
        then least recently used, and a request's tail before its head."""
        for block_id in reversed(self.req_blocks.pop(request.key, [])):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
        self.req_hashes.pop(request.key, None)
        self.req_num_cached.pop(request.key, None)
        self.req_room.pop(request.key, None)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use (vLLM's rule).
        The hit/query counters are cumulative and keep counting."""
        if self.num_used_blocks:
            return False
        self.cached.clear()
        for block in self.blocks:
            block.hash = None
        return True

    def _touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict its cached identity
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id

    def _tokens_placed(self, request: Request, num_tokens: int) -> None:
        """The request's first `num_tokens` tokens have their blocks: register the blocks
        they fill, and note how far it may go before `allocate_slots` has work again."""
        room = len(self.req_blocks[request.key]) * self.block_size
        if self.enable_prefix_caching and request.writes_prefix_cache:
            self._cache_full_blocks(request, num_tokens)
            next_to_register = self.req_num_cached.get(request.key, 0)
            room = min(room, (next_to_register + 1) * self.block_size - 1)
        self.req_room[request.key] = room

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Register the request's blocks that `num_tokens` fills, so others can share them.

        Safe before the step runs: every layer writes the whole batch's KV before any
        attention reads it, so a request that hits a block in the same step sees it filled.
        """
        start = self.req_num_cached.get(request.key, 0)
        # A block is named by its tokens: with steps in flight, the last tokens of one just
        # filled may still be placeholders, and it waits for them.
        if min(num_tokens, request.num_tokens) // self.block_size <= start:
            return
        owned = self.req_blocks[request.key]
        hashes = self._hashes(request)
        end = min(num_tokens // self.block_size, len(hashes))
        for i in range(start, end):
            block = self.blocks[owned[i]]
            h = hashes[i]
            if block.hash is None and h not in self.cached:  # else: shared, or computed elsewhere
                block.hash = h
                self.cached[h] = block.block_id
        self.req_num_cached[request.key] = max(start, end)
