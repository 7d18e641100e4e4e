"""The host-memory KV pool: evicted prefix blocks wait there under their key, come back layer by
layer on a prefix hit, and a block that a request still needs is never evicted."""
import pytest
import torch

from minicake.cache.block_manager import BlockManager
from minicake.cache.kv_pool import KVPool
from minicake.engine import Engine
from minicake.config import EngineConfig
from minicake.sampling import SamplingParams
from minicake.sched.sequence import Sequence

BLOCK = 4
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def caches(num_blocks=8, layers=2):
    """Per layer K and V: [num_blocks, block_size, num_kv_heads=1, head_dim=2], block b filled with b."""
    fill = torch.arange(num_blocks, dtype=torch.float32).view(-1, 1, 1, 1).expand(num_blocks, BLOCK, 1, 2)
    return [(fill.clone() + 100 * j, -fill.clone() - 100 * j) for j in range(layers)]


def computed(bm, tokens, request_id):
    """A sequence whose whole prompt the model has computed and the manager has keyed."""
    s = Sequence(request_id, list(tokens), SamplingParams())
    bm.allocate_prefix(s)
    assert bm.allocate_slots(s, s.num_uncomputed_tokens())
    s.num_computed_tokens = len(s)
    bm.cache_full_blocks(s)
    return s


def test_pool_keeps_a_copy_of_every_layer_and_checks_tokens_on_lookup():
    kv = caches()
    pool = KVPool(4, kv)
    pool.store(key=11, parent_key=None, token_ids=(1, 2, 3, 4), block_id=5)
    kv[1][0][5].zero_()  # the device block is reused: the pool's copy must not change
    k, v = pool.read_block(11, layer=1)
    assert torch.equal(k, torch.full((BLOCK, 1, 2), 105.0)) and torch.equal(v, torch.full((BLOCK, 1, 2), -105.0))
    assert pool.lookup(11, None, (1, 2, 3, 4))
    assert not pool.lookup(11, None, (1, 2, 3, 5)), "a hash collision is a miss, never served"
    assert not pool.lookup(11, 7, (1, 2, 3, 4)), "same tokens after another parent is another prefix"


def test_pool_evicts_least_recently_used_but_never_a_pinned_block():
    pool = KVPool(2, caches())
    pool.store(1, None, (1,), block_id=0)
    pool.store(2, None, (2,), block_id=1)
    pool.pin([1])  # e.g. a migration is reading it
    pool.store(3, None, (3,), block_id=2)
    assert 1 in pool and 2 not in pool and 3 in pool, "LRU victim is the oldest unpinned block"
    pool.pin([3])
    pool.store(4, None, (4,), block_id=3)
    assert 4 not in pool and pool.num_dropped == 1, "with every block pinned the new one is dropped"
    pool.unpin([1])
    pool.store(4, None, (4,), block_id=3)
    assert 1 not in pool and 4 in pool


def test_device_eviction_moves_blocks_to_the_pool_and_a_hit_schedules_a_load():
    kv = caches(num_blocks=4)
    bm = BlockManager(num_blocks=4, block_size=BLOCK)
    bm.pool = KVPool(8, kv)
    a = computed(bm, range(9), "a")  # 2 full keyed blocks + 1 partial
    a_blocks = list(a.block_table)
    bm.free(a), bm.forget(a)
    b = computed(bm, range(100, 116), "b")  # 4 blocks: evicts a's keyed blocks into the pool
    assert len(bm.pool) == 2 and all(bm.blocks[i].ref_count for i in b.block_table)
    assert torch.equal(bm.pool.read_block(next(iter(bm.pool.entries)), 0)[0],
                       kv[0][0][a_blocks[1]]), "tail block evicted first, with its K/V"
    bm.free(b), bm.forget(b)
    again = Sequence("a2", list(range(9)), SamplingParams())
    assert bm.allocate_prefix(again) == 8, "the prefix match continues in the pool"
    assert sorted(bm.pool.pending) == sorted(again.block_table)
    assert all(bm.pool.pins[k] == 1 for k in bm.pool.pending.values()), "blocks being loaded are pinned"
    bm.free(again), bm.forget(again)


def test_a_block_reused_before_its_load_ran_is_not_stored_back():
    bm = BlockManager(num_blocks=2, block_size=BLOCK)
    bm.pool = KVPool(4, caches(num_blocks=2))
    a = computed(bm, range(8), "a")
    bm.free(a), bm.forget(a)
    b = computed(bm, range(50, 58), "b")  # evicts a's two blocks into the pool
    bm.free(b), bm.forget(b)
    again = Sequence("a2", list(range(9)), SamplingParams())
    assert bm.allocate_prefix(again) == 8  # b's blocks go to the pool, a's come back (not loaded yet)
    bm.free(again), bm.forget(again)
    stored = bm.pool.num_stored
    c = computed(bm, range(70, 78), "c")  # reuses both blocks before any forward pass loaded them
    assert bm.pool.pending == {} and not any(bm.pool.pins.values()), "the loads are cancelled, pins released"
    assert bm.pool.num_stored == stored, "a block that never received its K/V is not stored back"
    assert len(bm.pool) == 4, "the pool still holds a's and b's blocks"
    bm.free(c), bm.forget(c)


def run(engine, prompts):
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}-{len(p)}-{p[0]}", p, GREEDY)
    tokens, cached = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            cached[out.request_id] = out.num_cached_tokens
    return [tokens[f"r{i}-{len(p)}-{p[0]}"] for i, p in enumerate(prompts)], \
        [cached[f"r{i}-{len(p)}-{p[0]}"] for i, p in enumerate(prompts)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the pinned pool and its copy stream need CUDA"))])
def test_a_pool_hit_gives_the_same_greedy_tokens_as_a_recompute(tiny_checkpoint, device):
    gen = torch.Generator().manual_seed(0)
    shared, others = torch.randint(3, 400, (21,), generator=gen).tolist(), \
        [torch.randint(3, 400, (30,), generator=gen).tolist() for _ in range(2)]
    settings = dict(model=str(tiny_checkpoint("llama")), device=device, dtype="float32", block_size=BLOCK,
                    num_kv_blocks=12, num_threads=1)
    pooled = Engine(EngineConfig(**settings, kv_pool_blocks=32))
    first, _ = run(pooled, [shared])
    run(pooled, others[:1]), run(pooled, others[1:])  # two 30-token prompts push `shared` off the device
    assert not any(pooled.block_manager.cached.get(k) is not None
                   for k in pooled.block_manager._keys(Sequence("probe", shared, GREEDY), 5)), \
        "the shared prefix was evicted from the device"
    again, cached = run(pooled, [shared])
    assert cached == [20] and pooled.block_manager.pool.num_loaded == 5, "5 blocks came back from the pool"
    recompute = Engine(EngineConfig(**settings, enable_prefix_caching=False))
    expected, _ = run(recompute, [shared])
    assert first == again == expected
