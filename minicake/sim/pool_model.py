"""Model of a prefill instance's host-memory KV pool (docs/design.md, KV pool), for the simulator.

The pool holds whole blocks by block key up to a capacity in tokens and evicts by LRU (the
paper's choice) or LFU (to compare), never a block that a queued or running request pinned.
It holds keys only, no tensors: the simulator needs what is cached, not the cache.
"""
import heapq
from collections import OrderedDict
from collections.abc import Iterable, Sequence


class KVPoolModel:
    def __init__(self, capacity_tokens: int | None, block_size: int, policy: str = "lru"):
        assert policy in ("lru", "lfu"), f"eviction policy must be lru or lfu, got {policy!r}"
        assert capacity_tokens is None or capacity_tokens >= block_size, \
            f"pool capacity {capacity_tokens} tokens holds not even one block of {block_size}"
        self.capacity_blocks = None if capacity_tokens is None else capacity_tokens // block_size
        self.policy = policy
        self._lru: OrderedDict[int, None] = OrderedDict()  # oldest first (policy lru)
        self._uses: dict[int, tuple[int, int]] = {}        # key -> (use count, last tick) (policy lfu)
        self._heap: list[tuple[int, int, int]] = []        # lazy (uses, tick, key) entries (policy lfu)
        self._tick = 0
        self._pins: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._lru) if self.policy == "lru" else len(self._uses)

    def __contains__(self, key: int) -> bool:
        return key in (self._lru if self.policy == "lru" else self._uses)

    def match_len(self, keys: Sequence[int]) -> int:
        """Number of leading blocks of `keys` held here: a prefix walk that stops at the first miss."""
        held = self._lru if self.policy == "lru" else self._uses
        n = 0
        for k in keys:
            if k not in held:
                break
            n += 1
        return n

    def access(self, keys: Sequence[int]) -> tuple[list[int], list[int]]:
        """Use (or store) every block of `keys`; returns (keys added, keys evicted).

        Keys are touched last block first, so a prompt's first block is the most recently
        used: eviction then cuts a cached prefix from its tail, never from its head.
        """
        added = []
        for k in reversed(keys):
            self._tick += 1
            if self.policy == "lru":
                if k in self._lru:
                    self._lru.move_to_end(k)
                else:
                    self._lru[k] = None
                    added.append(k)
            else:
                uses = self._uses.get(k, (0, 0))[0] + 1
                if uses == 1:
                    added.append(k)
                self._uses[k] = (uses, self._tick)
                heapq.heappush(self._heap, (uses, self._tick, k))
        if self.policy == "lfu" and len(self._heap) > 2 * len(self._uses) + 1024:  # drop stale entries
            self._heap = [(u, t, k) for k, (u, t) in self._uses.items()]
            heapq.heapify(self._heap)
        return added, self._evict()

    def pin(self, keys: Iterable[int]) -> None:
        for k in keys:
            self._pins[k] = self._pins.get(k, 0) + 1

    def unpin(self, keys: Iterable[int]) -> None:
        for k in keys:
            n = self._pins[k] - 1
            assert n >= 0, f"block {k} unpinned more often than pinned"
            if n:
                self._pins[k] = n
            else:
                del self._pins[k]

    def _evict(self) -> list[int]:
        if self.capacity_blocks is None:
            return []
        evicted, skipped = [], []
        while len(self) + len(skipped) > self.capacity_blocks:
            victim = self._pop_victim()
            if victim is None:
                break  # everything left is pinned: the pool stays over capacity until unpinned
            if victim[0] in self._pins:
                skipped.append(victim)
            else:
                evicted.append(victim[0])
        for k, uses in skipped:  # pinned blocks are in use: put them back as just used
            self._tick += 1
            if self.policy == "lru":
                self._lru[k] = None
            else:
                self._uses[k] = (uses, self._tick)
                heapq.heappush(self._heap, (uses, self._tick, k))
        return evicted

    def _pop_victim(self) -> tuple[int, int] | None:
        """Remove and return (key, use count) of the next block to evict, pinned or not."""
        if self.policy == "lru":
            return (self._lru.popitem(last=False)[0], 0) if self._lru else None
        while self._heap:
            uses, tick, k = heapq.heappop(self._heap)
            if self._uses.get(k) == (uses, tick):  # skip stale entries
                del self._uses[k]
                return k, uses
        return None
