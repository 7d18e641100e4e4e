"""The host-memory KV pool of an instance (docs/design.md, KV pool): evicted full blocks, by block key.

When the device block manager evicts a full, keyed block, its K/V of every layer are copied
into a preallocated host buffer (pinned memory on CUDA) under the block's key; the pool
itself evicts LRU. A request whose prefix continues in the pool gets fresh device blocks, and
their K/V are loaded back layer by layer while the rest of the prompt is prefilled: before
layer j computes, its copy is complete and the copy of layer j+1 is issued (on CUDA on a copy
stream that overlaps the compute; on CPU the copies are synchronous, issued a layer ahead).
An entry that a pending load or a migration reads is pinned: it is never evicted.
"""
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class PoolEntry:
    slot: int  # index into the host buffer
    parent_key: int | None
    token_ids: tuple[int, ...]  # kept to detect a hash collision, never to serve one


class KVPool:
    def __init__(self, capacity_blocks: int, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]):
        assert capacity_blocks > 0, f"a KV pool needs room for at least one block, got {capacity_blocks}"
        self.kv_caches = kv_caches
        like = kv_caches[0][0]  # [num_blocks, block_size, num_kv_heads, head_dim]
        self.cuda = like.device.type == "cuda"
        # host: [capacity, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]
        self.host = torch.zeros((capacity_blocks, len(kv_caches), 2, *like.shape[1:]), dtype=like.dtype,
                                pin_memory=self.cuda)
        self.capacity_blocks = capacity_blocks
        self.entries: OrderedDict[int, PoolEntry] = OrderedDict()  # key -> entry, least recently used first
        self.free_slots = list(range(capacity_blocks))
        self.pins: Counter[int] = Counter()  # key -> readers that need it to stay
        self.pending: dict[int, int] = {}  # device block id -> key whose K/V it still has to receive
        self.copy_stream = torch.cuda.Stream(like.device) if self.cuda else None
        self.num_stored = self.num_loaded = self.num_dropped = 0
        self._loads: list[tuple[int, int]] = []  # (device block id, host slot) of the forward pass running
        self._events: dict[int, object] = {}  # layer -> CUDA event that ends its copy

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: int) -> bool:
        return key in self.entries

    def lookup(self, key: int, parent_key: int | None, token_ids: tuple[int, ...]) -> bool:
        """A hit only if the key holds the same tokens after the same parent; a hit is used now."""
        entry = self.entries.get(key)
        if entry is None or entry.parent_key != parent_key or entry.token_ids != token_ids:
            return False
        self.entries.move_to_end(key)
        return True

    def store(self, key: int, parent_key: int | None, token_ids: tuple[int, ...], block_id: int) -> None:
        """Copy device block `block_id` (every layer) into the pool under `key`. If every
        entry is pinned the block is dropped: the pool never evicts a block in use."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        if not self.free_slots and not self._evict_one():
            self.num_dropped += 1
            return
        slot = self.free_slots.pop()
        for j, (k_cache, v_cache) in enumerate(self.kv_caches):
            self.host[slot, j, 0].copy_(k_cache[block_id])
            self.host[slot, j, 1].copy_(v_cache[block_id])
        self.entries[key] = PoolEntry(slot, parent_key, token_ids)
        self.num_stored += 1

    def _evict_one(self) -> bool:
        for key in self.entries:  # least recently used first
            if not self.pins[key]:
                self.free_slots.append(self.entries.pop(key).slot)
                del self.pins[key]
                return True
        return False

    def pin(self, keys) -> None:
        for key in keys:
            assert key in self.entries, f"block {key} is not in the pool"
            self.pins[key] += 1

    def unpin(self, keys) -> None:
        for key in keys:
            assert self.pins[key] > 0, f"block {key} unpinned more often than pinned"
            self.pins[key] -= 1

    def schedule_load(self, key: int, block_id: int) -> None:
        """Device block `block_id` receives the pool's copy of `key` at the next forward pass,
        layer by layer; until then the entry is pinned."""
        assert block_id not in self.pending, f"device block {block_id} already waits for a load"
        self.pin([key])
        self.pending[block_id] = key

    def cancel_load(self, block_id: int) -> bool:
        """The device block is reused before its load ran; True if it had one."""
        key = self.pending.pop(block_id, None)
        if key is not None:
            self.unpin([key])
        return key is not None

    def read_block(self, key: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer of a pooled block: [block_size, num_kv_heads, head_dim] each."""
        slot = self.entries[key].slot
        return self.host[slot, layer, 0], self.host[slot, layer, 1]

    def begin_loads(self) -> bool:
        """Issue layer 0 of every pending load; False when none is pending. A forward pass that
        loads passes `before_layer` as the model's hook (it runs before each layer j) and calls
        end_loads() after the last layer."""
        if not self.pending:
            return False
        self._loads = [(block_id, self.entries[key].slot) for block_id, key in self.pending.items()]
        if self.cuda:  # the blocks may have been read by kernels still queued on the compute stream
            self.copy_stream.wait_stream(torch.cuda.current_stream())
        self._events = {0: self._issue_layer(0, self._loads)}
        return True

    def before_layer(self, layer: int) -> None:
        """Layer `layer`'s K/V are in place when this returns; layer + 1's copy is under way."""
        if layer + 1 < len(self.kv_caches):
            self._events[layer + 1] = self._issue_layer(layer + 1, self._loads)  # overlaps layer's compute
        event = self._events.pop(layer)
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def end_loads(self) -> None:
        self.unpin(self.pending.values())
        self.num_loaded += len(self.pending)
        self.pending.clear()
        self._loads, self._events = [], {}

    def _issue_layer(self, layer: int, loads: list[tuple[int, int]]):
        """Copy one layer of every pending block host -> device; on CUDA an event marks the end."""
        k_cache, v_cache = self.kv_caches[layer]
        if not self.cuda:
            for block_id, slot in loads:
                k_cache[block_id].copy_(self.host[slot, layer, 0])
                v_cache[block_id].copy_(self.host[slot, layer, 1])
            return None
        with torch.cuda.stream(self.copy_stream):
            for block_id, slot in loads:
                k_cache[block_id].copy_(self.host[slot, layer, 0], non_blocking=True)
                v_cache[block_id].copy_(self.host[slot, layer, 1], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return event
