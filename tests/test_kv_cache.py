import pytest
import torch

from minicake.cache.kv_cache import allocate_kv_caches, bytes_per_block, num_blocks_for
from minicake.config import EngineConfig
from minicake.engine import Engine


def test_a_block_holds_k_and_v_of_every_layer():
    # smollm2-135m: 30 layers, 3 KV heads of 64, fp32: 46 KiB per token
    assert bytes_per_block(30, 3, 64, 16, torch.float32) == 2 * 30 * 16 * 3 * 64 * 4


def test_the_cache_has_one_k_and_one_v_tensor_per_layer():
    caches = allocate_kv_caches(2, num_blocks=5, block_size=4, num_kv_heads=3, head_dim=8,
                                dtype=torch.float32, device=torch.device("cpu"))
    assert len(caches) == 2 and all(k.shape == v.shape == (5, 4, 3, 8) for k, v in caches)


def test_a_budget_smaller_than_one_block_is_refused():
    with pytest.raises(ValueError, match="kv_cache_memory"):
        num_blocks_for(1000, 4096)


def test_the_engine_sizes_its_cache_from_the_memory_budget(tiny_checkpoint):
    config = EngineConfig(model=str(tiny_checkpoint("llama")), device="cpu", block_size=4,
                          kv_cache_memory=100_000, num_threads=1)
    engine = Engine(config)
    mc = engine.model_config
    block_bytes = bytes_per_block(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, 4, torch.float32)
    assert engine.stats()["num_blocks"] == 100_000 // block_bytes


@pytest.mark.parametrize("field, value", [
    ("block_size", 0), ("max_num_batched_tokens", -5), ("num_kv_blocks", 0), ("kv_cache_memory", 1.5),
    ("kv_cache_fraction", 0), ("kernels", "cuda"), ("dtype", "fp8"), ("device", 0),
])
def test_bad_engine_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})
