"""The preallocated paged KV cache: how many blocks fit in a memory budget, and the tensors.

Per layer one K and one V tensor `[num_blocks, block_size, num_kv_heads, head_dim]`,
allocated once when the engine starts, so serving never allocates KV memory. The budget is
`kv_cache_memory` bytes, or a fraction of the device's free memory; the size is logged in GiB.
"""
import logging

import torch

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


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Left uninitialized: attention never reads a slot before it is written (the kernel tests
    fill unowned slots with NaN to prove it), and on a CPU untouched pages cost no memory."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = [(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
              for _ in range(num_layers)]
    gib = num_blocks * bytes_per_block(num_layers, num_kv_heads, head_dim, block_size, dtype) / 2**30
    logger.info("KV cache: %d blocks of %d tokens (%d tokens), %.2f GiB on %s",
                num_blocks, block_size, num_blocks * block_size, gib, device)
    return caches
