"""Which replica of a model takes a request: the least loaded one, unless a replica already
served the request's prefix (its first blocks hash alike) and is not overloaded, in which case
that replica, whose prefix cache probably still holds those blocks (SGLang's cache-aware
routing). Pure bookkeeping: no sockets, no engines; the router feeds it loads."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence


class ReplicaPolicy:
    """Least loaded, with prefix affinity.

    `block_size`: the engines' KV block size (prefix caching works in whole blocks).
    `affinity_blocks`: how many leading full blocks make a prompt's affinity key.
    A replica is overloaded when its load exceeds the least loaded replica's by more than
    `balance_abs` *and* by a factor of more than `balance_rel`; affinity then yields to load.
    `affinity=False` routes by load alone (ties broken at random)."""

    def __init__(
        self,
        block_size: int = 16,
        affinity_blocks: int = 4,
        balance_abs: int = 16,
        balance_rel: float = 1.5,
        affinity: bool = True,
        max_prefixes: int = 65536,
        seed: int | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if affinity_blocks < 1:
            raise ValueError(f"affinity_blocks must be >= 1, got {affinity_blocks}")
        if balance_abs < 0 or balance_rel < 1:
            raise ValueError(
                f"balance_abs must be >= 0 and balance_rel >= 1, got {balance_abs}, {balance_rel}"
            )
        self.block_size = block_size
        self.affinity_blocks = affinity_blocks
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.affinity = affinity
        self.max_prefixes = max_prefixes
        self._owner: OrderedDict[int, Hashable] = OrderedDict()  # prefix key -> replica (LRU)
        self._random = random.Random(seed)

    def prefix_key(self, prompt_token_ids: Sequence[int]) -> int | None:
        """The hash of the prompt's first `affinity_blocks` full blocks (fewer if the prompt is
        shorter); None when it has no full block, so no prefix worth following."""
        n_blocks = min(self.affinity_blocks, len(prompt_token_ids) // self.block_size)
        if n_blocks == 0:
            return None
        return hash(tuple(prompt_token_ids[: n_blocks * self.block_size]))

    def overloaded(self, load: int, least: int) -> bool:
        return load > least + self.balance_abs and load > least * self.balance_rel

    def choose(self, prompt_token_ids: Sequence[int], loads: Mapping[Hashable, int]) -> Hashable:
        """The replica for this prompt, among `loads` (replica -> requests running + waiting),
        and remember it as the owner of the prompt's prefix."""
        if not loads:
            raise ValueError("no replica to choose from")
        least = min(loads.values())
        key = self.prefix_key(prompt_token_ids) if self.affinity else None
        owner = self._owner.get(key) if key is not None else None
        if owner not in loads or self.overloaded(loads[owner], least):
            owner = self._random.choice([r for r, load in loads.items() if load == least])
        if key is not None:
            self._owner[key] = owner
            self._owner.move_to_end(key)
            if len(self._owner) > self.max_prefixes:
                self._owner.popitem(last=False)
        return owner

    def forget(self, replica: Hashable) -> None:
        """A replica left the pool: its prefixes go to whoever serves them next."""
        for key in [k for k, r in self._owner.items() if r == replica]:
            del self._owner[key]
