"""The Triton KV store writes exactly the slots the torch reference writes, and skips slot -1."""
import pytest
import torch

from minicake.kernels.reference import store_kv_ref
from minicake.kernels.store_kv import store_kv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_step(num_tokens, num_kv_heads, head_dim, num_blocks=6, block_size=16, dtype=torch.float32):
    """New K/V for num_tokens tokens, a cache of random values, and a random slot per token."""
    gen = torch.Generator().manual_seed(num_tokens * 10 + num_kv_heads)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    v_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    return [t.to(DEVICE) for t in (k.to(dtype), v.to(dtype), k_cache, v_cache, slot_mapping)]


@pytest.mark.parametrize("num_kv_heads, head_dim", [(3, 64), (2, 128), (1, 64)])
def test_store_kv_writes_the_same_slots_as_the_reference(num_kv_heads, head_dim):
    k, v, k_cache, v_cache, slot_mapping = random_step(20, num_kv_heads, head_dim)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    store_kv_ref(k, v, expected_k, expected_v, slot_mapping)
    store_kv(k, v, k_cache, v_cache, slot_mapping.to(torch.int32))
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_store_kv_skips_slot_minus_one():
    k, v, k_cache, v_cache, slot_mapping = random_step(8, 3, 64)
    slot_mapping[[1, 5]] = -1  # e.g. tokens whose block came from the prefix cache
    before_k, before_v = k_cache.clone(), v_cache.clone()
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    flat_k, flat_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)  # [num_slots, num_kv_heads, head_dim]
    written = slot_mapping[slot_mapping >= 0]
    assert torch.equal(flat_k[written], k[slot_mapping >= 0])
    assert torch.equal(flat_v[written], v[slot_mapping >= 0])
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device=DEVICE)
    untouched[written] = False
    assert torch.equal(flat_k[untouched], before_k.flatten(0, 1)[untouched])
    assert torch.equal(flat_v[untouched], before_v.flatten(0, 1)[untouched])


def test_store_kv_keeps_bf16_bits():
    k, v, k_cache, v_cache, slot_mapping = random_step(5, 2, 64, dtype=torch.bfloat16)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    store_kv_ref(k, v, expected_k, expected_v, slot_mapping)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_store_kv_names_a_bad_slot_mapping():
    k, v, k_cache, v_cache, slot_mapping = random_step(4, 2, 64)
    with pytest.raises(ValueError, match="slot_mapping must be int32/int64"):
        store_kv(k, v, k_cache, v_cache, slot_mapping.float())
