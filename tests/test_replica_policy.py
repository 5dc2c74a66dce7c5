"""The replica-choice policy on its own: least loaded, prefix affinity, overload, forgetting."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zllm.frontend.replica_policy import ReplicaPolicy


def prompt(prefix: int, n: int = 80, tail: int = 0) -> list[int]:
    return [prefix * 1000 + i for i in range(n)] + [tail]


def test_no_full_block_goes_to_the_least_loaded():
    policy = ReplicaPolicy(block_size=16)
    assert policy.prefix_key(list(range(15))) is None
    assert policy.choose(list(range(15)), {"a": 3, "b": 1, "c": 2}) == "b"


def test_prefix_key_covers_only_the_first_blocks():
    policy = ReplicaPolicy(block_size=16, affinity_blocks=2)
    assert policy.prefix_key(prompt(1, tail=5)) == policy.prefix_key(prompt(1, tail=6))
    assert policy.prefix_key(list(range(32)) + [1]) == policy.prefix_key(list(range(32)) + [2])
    assert policy.prefix_key(list(range(32))) != policy.prefix_key([99] + list(range(1, 32)))


def test_same_prefix_follows_its_replica_while_not_overloaded():
    policy = ReplicaPolicy(block_size=16, balance_abs=4, balance_rel=1.5)
    first = policy.choose(prompt(1), {"a": 0, "b": 0})
    other = "b" if first == "a" else "a"
    # The owner is busier, but within the margin: affinity wins.
    assert policy.choose(prompt(1, tail=1), {first: 4, other: 0}) == first
    # Another prefix goes to the least loaded.
    assert policy.choose(prompt(2), {first: 4, other: 0}) == other


def test_overloaded_owner_loses_its_prefix():
    policy = ReplicaPolicy(block_size=16, balance_abs=4, balance_rel=1.5)
    assert policy.choose(prompt(1), {"a": 0, "b": 1}) == "a"
    assert policy.choose(prompt(1), {"a": 6, "b": 1}) == "b"  # 6 > 1 + 4 and 6 > 1.5
    # ... and the prefix now belongs to b.
    assert policy.choose(prompt(1), {"a": 1, "b": 3}) == "b"


def test_relative_margin_keeps_affinity_on_busy_pools():
    policy = ReplicaPolicy(block_size=16, balance_abs=4, balance_rel=1.5)
    assert policy.choose(prompt(1), {"a": 0, "b": 1}) == "a"
    assert policy.choose(prompt(1), {"a": 40, "b": 30}) == "a"  # 40 < 30 * 1.5


def test_forgotten_or_missing_replica_is_not_chosen():
    policy = ReplicaPolicy(block_size=16)
    assert policy.choose(prompt(1), {"a": 0, "b": 5}) == "a"
    assert policy.choose(prompt(1), {"b": 5, "c": 7}) == "b"  # a left the pool
    policy.forget("b")
    assert policy.choose(prompt(1), {"b": 5, "c": 0}) == "c"


def test_without_affinity_only_load_counts():
    policy = ReplicaPolicy(block_size=16, affinity=False, seed=0)
    choices = {policy.choose(prompt(1), {"a": 0, "b": 0}) for _ in range(50)}
    assert choices == {"a", "b"}
    assert policy.choose(prompt(1), {"a": 1, "b": 0}) == "b"


def test_prefix_memory_is_bounded():
    policy = ReplicaPolicy(block_size=1, max_prefixes=3)
    for p in range(10):
        policy.choose([p], {"a": 0})
    assert len(policy._owner) == 3


def test_bad_settings_name_the_field():
    for kwargs, field in [
        ({"block_size": 0}, "block_size"),
        ({"affinity_blocks": 0}, "affinity_blocks"),
        ({"balance_rel": 0.5}, "balance_rel"),
    ]:
        with pytest.raises(ValueError, match=field):
            ReplicaPolicy(**kwargs)
    with pytest.raises(ValueError, match="no replica"):
        ReplicaPolicy().choose([1], {})


@given(
    loads=st.dictionaries(st.sampled_from("abcd"), st.integers(0, 100), min_size=1),
    tokens=st.lists(st.integers(0, 50), max_size=70),
)
def test_choice_is_a_replica_never_overloaded(loads, tokens):
    policy = ReplicaPolicy(block_size=16, balance_abs=8, balance_rel=1.5)
    policy.choose(tokens, {r: 0 for r in loads})  # some owner for the prefix
    chosen = policy.choose(tokens, loads)
    assert chosen in loads
    assert not policy.overloaded(loads[chosen], min(loads.values()))
