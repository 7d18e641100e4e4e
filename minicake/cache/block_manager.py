"""Block manager over the paged KV cache: reference counts, block tables, prefix caching.

The KV cache is `num_blocks` fixed blocks of `block_size` token slots. A sequence's block
table lists its blocks in token order. With prefix caching (docs/design.md, Block keys) every full,
computed block gets its chained key; a new sequence whose leading blocks have known keys
(and the same token ids: a hash collision is never served) shares those blocks instead of
computing them. A block whose last user left keeps its key and stays revivable until the
allocator needs it: unkeyed free blocks are handed out first, then keyed ones, LRU first.
With a host KV pool (cache/kv_pool.py) an evicted keyed block is copied there, and a prefix
match that ends on the device continues in the pool.
"""
from collections import OrderedDict, deque

from minicake.cache.block_keys import block_key
from minicake.sched.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "key", "parent_key", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.key: int | None = None  # set once the block is full and computed
        self.parent_key: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0, "need at least one block of at least one slot"
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: deque[int] = deque(range(num_blocks))  # free and unkeyed
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free but keyed, LRU first
        self.cached: dict[int, int] = {}  # block key -> block id
        self.prefix_queries_tokens = 0
        self.prefix_hits_tokens = 0
        self.seq_keys: dict[str, list[int]] = {}  # request id -> keys of its full blocks so far
        self.pool = None  # a KVPool (cache/kv_pool.py): evicted keyed blocks go there, hits come back

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids) + len(self.evictable)

    def usage(self) -> float:
        return 1 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_prefix(self, seq: Sequence) -> int:
        """Give a sequence without blocks the cached blocks of its longest cached prefix.

        The last token is never served from the cache: its logits are needed to sample.
        Returns the number of cached tokens, now counted as computed.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0, "sequence already holds blocks"
        hits = []
        if self.enable_prefix_caching:
            keys = self._keys(seq, (len(seq) - 1) // self.block_size)
            parent = None
            for i, key in enumerate(keys):
                block_id = self.cached.get(key)
                tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
                if block_id is None or self.blocks[block_id].token_ids != tokens \
                        or self.blocks[block_id].parent_key != parent:
                    break
                self._acquire(block_id)
                hits.append(block_id)
                parent = key
            if self.pool is not None:
                hits += self._load_from_pool(seq, keys[len(hits):], len(hits), parent)
        seq.block_table = hits
        seq.num_computed_tokens = len(hits) * self.block_size
        return seq.num_computed_tokens

    def _load_from_pool(self, seq: Sequence, keys: list[int], first: int, parent: int | None) -> list[int]:
        """Continue a prefix match in the host pool: each hit gets a fresh keyed device block whose
        K/V the pool loads at the next forward pass (before any layer reads it)."""
        loaded = []
        for i, key in enumerate(keys, start=first):
            tokens = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            if key in self.cached or not self.num_free_blocks or not self.pool.lookup(key, parent, tokens):
                break
            block_id = self._take_free_block()
            block = self.blocks[block_id]
            block.key, block.parent_key, block.token_ids = key, parent, tokens
            self.cached[key] = block_id
            self.pool.schedule_load(key, block_id)
            loaded.append(block_id)
            parent = key
        return loaded

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Counted once per request, when it is first admitted (not again after preemption)."""
        self.prefix_queries_tokens += num_tokens
        self.prefix_hits_tokens += num_hit_tokens

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Add blocks so that num_computed + num_new tokens fit; False (nothing taken) if short."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())
        return True

    def free(self, seq: Sequence) -> None:
        """Release a sequence's blocks. Tail blocks go to the LRU end first, so that under
        pressure a prefix loses its last blocks before its first ones."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.key is None:
                    self.free_block_ids.append(block_id)
                else:
                    self.evictable[block_id] = None
        seq.block_table = []

    def forget(self, seq: Sequence) -> None:
        """The sequence is gone for good: drop its key bookkeeping (its blocks must be freed)."""
        assert not seq.block_table, "free the blocks before forgetting the sequence"
        self.seq_keys.pop(seq.request_id, None)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Key every full, computed block of the sequence so later requests can share it."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        keys = self._keys(seq, num_full)
        for i in range(num_full):
            block = self.blocks[seq.block_table[i]]
            if block.key is not None or keys[i] in self.cached:
                continue  # already keyed, or an identical block holds this key
            block.key = keys[i]
            block.parent_key = keys[i - 1] if i > 0 else None
            block.token_ids = tuple(seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            self.cached[block.key] = block.block_id

    def _keys(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Keys of the first num_blocks full blocks, extending the sequence's chain as needed."""
        keys = self.seq_keys.setdefault(seq.request_id, [])
        bs = self.block_size
        while len(keys) < num_blocks:
            start = len(keys) * bs
            keys.append(block_key(keys[-1] if keys else None, seq.token_ids[start:start + bs]))
        return keys

    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.evictable[block_id]  # revived from the free list
        block.ref_count += 1

    def _take_free_block(self) -> int:
        if self.free_block_ids:
            block_id = self.free_block_ids.popleft()
        else:
            block_id, _ = self.evictable.popitem(last=False)  # evict the least recently freed
            block = self.blocks[block_id]
            del self.cached[block.key]
            if self.pool is not None and not self.pool.cancel_load(block_id):  # a loaded block only
                self.pool.store(block.key, block.parent_key, block.token_ids, block_id)
            block.key, block.parent_key, block.token_ids = None, None, ()
        assert self.blocks[block_id].ref_count == 0, f"block {block_id} is still in use"
        self.blocks[block_id].ref_count = 1
        return block_id
