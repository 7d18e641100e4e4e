"""The preallocated paged KV cache: how many blocks fit in a memory budget, and the tensors.

Per layer one K and one V tensor `[num_blocks, block_size, num_kv_heads, head_dim]`,
allocated once and zeroed when the engine starts, so serving never allocates KV memory and the
size logged (in GiB) is resident from the start. The budget is `kv_cache_memory` bytes, or a
fraction of the device's free memory; CPU instances of one host share it (`host_kv_budgets`).
"""
import logging

import torch

from minicake.config import EngineConfig
from minicake.model.config import ModelConfig
from minicake.model.llama import CausalLM
from minicake.model.loader import default_dtype

logger = logging.getLogger("minicake")


def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                    dtype: torch.dtype) -> int:
    """K and V of every layer for block_size tokens."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def free_memory(device: torch.device) -> int:
    """Bytes the device can still give: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo; pass kv_cache_memory or num_kv_blocks")


def num_blocks_for(budget_bytes: int, block_bytes: int) -> int:
    num_blocks = budget_bytes // block_bytes
    if num_blocks < 1:
        raise ValueError(f"a KV cache budget of {budget_bytes} bytes holds no block of {block_bytes} bytes; "
                         "raise kv_cache_memory (or kv_cache_fraction)")
    return num_blocks


def weight_bytes(model_config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the model's parameters in `dtype` (a tied embedding counted once)."""
    with torch.device("meta"):
        model = CausalLM(model_config)
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def share_host_memory(available: int, fraction: float, reserved: list[int], min_cache: int) -> list[int]:
    """The KV cache bytes of each of the instances that share one host's `available` bytes:
    `fraction` of what is left once each holds its `reserved` bytes (weights, host KV pool),
    in equal shares. Raises ValueError naming the numbers when a share is under `min_cache`."""
    n, left = len(reserved), available - sum(reserved)
    share = int(left * fraction) // n
    if share < min_cache:
        gib = 2**30
        raise ValueError(f"{n} instance(s) do not fit in this host's memory: MemAvailable {available / gib:.2f} GiB "
                         f"- {sum(reserved) / gib:.2f} GiB of weights and KV pools = {left / gib:.2f} GiB, of which "
                         f"kv_cache_fraction {fraction:g} gives each instance {share / gib:.3f} GiB of KV cache, less "
                         f"than the {min_cache / gib:.3f} GiB of one request of max_model_len tokens: run fewer "
                         "instances, raise kv_cache_fraction, lower max_model_len, or set kv_cache_memory or num_kv_blocks")
    return [share] * n


def host_kv_budgets(configs: list[EngineConfig], model_config: ModelConfig, max_model_len: int) -> list[int]:
    """The KV cache bytes of each CPU instance process of one host (one config each): the
    host's MemAvailable now, before any of them loads its weights, shared by `share_host_memory`."""
    cfg = configs[0]
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else default_dtype(torch.device("cpu"))
    mc = model_config
    block_bytes = bytes_per_block(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, cfg.block_size, dtype)
    weights = weight_bytes(mc, dtype)
    reserved = [weights + c.kv_pool_blocks * block_bytes for c in configs]
    min_cache = -(-max_model_len // cfg.block_size) * block_bytes
    available = free_memory(torch.device("cpu"))
    shares = share_host_memory(available, cfg.kv_cache_fraction, reserved, min_cache)
    logger.info("KV cache: %d instance(s) share this host's MemAvailable %.2f GiB: less %.2f GiB of weights each "
                "(and KV pools), kv_cache_fraction %g of the rest gives each %.2f GiB", len(configs),
                available / 2**30, weights / 2**30, cfg.kv_cache_fraction, shares[0] / 2**30)
    return shares


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed, which touches every page: untouched CPU pages would be resident only once written,
    so the process would grow for hours past the size logged here. (Attention never reads a slot
    before it is written: the kernel tests fill unowned slots with NaN to prove it.)"""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
              for _ in range(num_layers)]
    gib = num_blocks * bytes_per_block(num_layers, num_kv_heads, head_dim, block_size, dtype) / 2**30
    logger.info("KV cache: %d blocks of %d tokens (%d tokens), %.2f GiB on %s",
                num_blocks, block_size, num_blocks * block_size, gib, device)
    return caches
