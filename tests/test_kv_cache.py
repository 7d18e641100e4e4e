import subprocess
import sys

import pytest
import torch

from minicake.cache.kv_cache import allocate_kv_caches, bytes_per_block, num_blocks_for, share_host_memory
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


GIB = 2**30


def test_instances_of_one_host_share_its_memory_once_their_weights_are_in():
    # 20 GiB available; 4 instances of 0.5 GiB of weights, the first two with a 1 GiB host KV pool
    shares = share_host_memory(20 * GIB, 0.25, [GIB // 2, GIB // 2, 3 * GIB // 2, 3 * GIB // 2], min_cache=GIB // 4)
    assert shares == [GIB] * 4 and sum(shares) == (20 - 4) * GIB * 0.25


def test_a_layout_that_does_not_fit_the_host_is_refused_naming_the_numbers():
    with pytest.raises(ValueError, match=r"4 instance\(s\) do not fit in this host's memory: MemAvailable 2.00 GiB "
                                         r"- 2.00 GiB of weights and KV pools = 0.00 GiB"):
        share_host_memory(2 * GIB, 0.3, [GIB // 2] * 4, min_cache=GIB // 4)


def test_a_cluster_that_does_not_fit_is_refused_before_any_process_starts(tiny_checkpoint, monkeypatch):
    from minicake.disagg import cluster, node
    monkeypatch.setattr(node, "launch", lambda *args, **kwargs: pytest.fail("an instance process was started"))
    config = EngineConfig(model=str(tiny_checkpoint("llama")), device="cpu", kv_cache_fraction=1e-9)
    with pytest.raises(ValueError, match="do not fit in this host's memory.*raise kv_cache_fraction"):
        cluster.Cluster(config, prefill_instances=2, decode_instances=2)


RESIDENT_GROWTH = """
import torch
from minicake.cache.kv_cache import allocate_kv_caches
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
before = resident()
caches = allocate_kv_caches(4, num_blocks=256, block_size=16, num_kv_heads=4, head_dim=64,
                            dtype=torch.float32, device=torch.device("cpu"))
print(resident() - before)
"""


def test_the_cache_is_resident_from_its_allocation():
    """The logged size is memory in use now, not a reservation that fills in while serving."""
    size = 2 * 4 * 256 * 16 * 4 * 64 * 4  # 64 MiB
    growth = int(subprocess.run([sys.executable, "-c", RESIDENT_GROWTH], capture_output=True, text=True,
                                check=True, timeout=120).stdout)
    assert growth == pytest.approx(size, rel=0.1)


@pytest.mark.parametrize("field, value", [
    ("block_size", 0), ("max_num_batched_tokens", -5), ("num_kv_blocks", 0), ("kv_cache_memory", 1.5),
    ("kv_cache_fraction", 0), ("kernels", "cuda"), ("dtype", "fp8"), ("device", 0),
])
def test_bad_engine_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})
