from minicake.cache.block_manager import BlockManager
from minicake.sampling import SamplingParams
from minicake.sched.sequence import Sequence


def seq(tokens, request_id="r"):
    return Sequence(request_id, list(tokens), SamplingParams())


def compute_all(bm, s):
    """Pretend the model ran the whole sequence: allocate, compute, key the full blocks."""
    bm.allocate_prefix(s)
    assert bm.allocate_slots(s, s.num_uncomputed_tokens())
    s.num_computed_tokens = len(s)
    bm.cache_full_blocks(s)


def test_block_table_covers_every_token():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    s = seq(range(10))
    assert bm.allocate_slots(s, 10)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    assert bm.num_free_blocks == 5
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == []


def test_allocation_fails_whole_when_blocks_are_short():
    bm = BlockManager(num_blocks=2, block_size=4, enable_prefix_caching=False)
    s = seq(range(12))
    assert not bm.allocate_slots(s, 12)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_prefix_hit_shares_blocks_and_never_serves_the_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq(range(12), "a")
    compute_all(bm, a)
    b = seq(range(12), "b")  # the same 12 tokens: 3 full blocks, but the last token is computed
    assert bm.allocate_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2


def test_prefix_hit_stops_at_the_first_different_block():
    bm = BlockManager(num_blocks=16, block_size=4)
    compute_all(bm, seq(range(12), "a"))
    b = seq([0, 1, 2, 3, 4, 5, 6, 99, 8, 9, 10, 11, 12], "b")
    assert bm.allocate_prefix(b) == 4


def test_freed_blocks_keep_their_key_until_reused():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(range(9), "a")
    compute_all(bm, a)
    bm.free(a)
    bm.forget(a)
    assert bm.num_free_blocks == 4  # cached blocks count as free: they are evictable
    b = seq(range(9), "b")
    assert bm.allocate_prefix(b) == 8  # revived
    bm.free(b)
    c = seq(range(100, 116), "c")  # needs all 4 blocks: the cached ones are evicted
    assert bm.allocate_slots(c, 16)
    bm.free(c)
    assert bm.allocate_prefix(seq(range(9), "d")) == 0


def test_unkeyed_blocks_are_handed_out_before_cached_ones():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(range(8), "a")
    compute_all(bm, a)
    bm.free(a)
    c = seq(range(100, 108), "c")
    assert bm.allocate_slots(c, 8)
    assert not set(c.block_table) & {0, 1}  # a's cached blocks 0, 1 survive
    assert bm.allocate_prefix(seq(range(9), "b")) == 8


def test_a_key_collision_is_detected_by_token_ids():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(5), "a")
    compute_all(bm, a)
    block = bm.blocks[a.block_table[0]]
    block.token_ids = (9, 9, 9, 9)  # as if another prefix had hashed to the same key
    assert bm.allocate_prefix(seq(range(5), "b")) == 0


def test_prefix_caching_off_shares_nothing():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    compute_all(bm, seq(range(9), "a"))
    assert bm.allocate_prefix(seq(range(9), "b")) == 0
