"""Which device each instance process runs on, and what a GPU can do.

`assign_devices` turns one --device flag into a device per rank, or a one-line error for a
layout NCCL cannot run (it needs one GPU per rank). `gpu_spec` looks a GPU's datasheet peaks up
by its name: the cost model's GPU profile and the kernel benchmark's bandwidth bound read them.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPUSpec:
    bf16_flops: float  # dense bf16 tensor-core FLOP/s with fp32 accumulate (no sparsity)
    hbm_bytes_s: float  # memory bandwidth, bytes/s


# by device-name substring, first match wins: a longer name before the name it contains.
# Sources: NVIDIA's datasheets (H100, H200, GH200, A100, L40S, L40, L4: the sparsity figures halved)
# and architecture whitepapers (RTX 4090: Ada, RTX 3090: GA102).
GPU_SPECS = (
    ("GH200", GPUSpec(989e12, 4.0e12)),
    ("H200 NVL", GPUSpec(835e12, 4.8e12)),
    ("H200", GPUSpec(989e12, 4.8e12)),
    ("H100 PCIe", GPUSpec(756e12, 2.0e12)),
    ("H100 NVL", GPUSpec(835e12, 3.9e12)),
    ("H100", GPUSpec(989e12, 3.35e12)),  # SXM5
    ("A100-SXM4-80GB", GPUSpec(312e12, 2.039e12)),
    ("A100 80GB PCIe", GPUSpec(312e12, 1.935e12)),
    ("A100", GPUSpec(312e12, 1.555e12)),  # 40 GB
    ("L40S", GPUSpec(362e12, 0.864e12)),
    ("L40", GPUSpec(181e12, 0.864e12)),
    ("L4", GPUSpec(121e12, 0.300e12)),
    ("RTX 4090", GPUSpec(165e12, 1.008e12)),
    ("RTX 3090", GPUSpec(71e12, 0.936e12)),
)


def gpu_spec(device_name: str) -> GPUSpec | None:
    """The datasheet peaks of the GPU named `device_name` (torch.cuda.get_device_name), or None."""
    return next((spec for key, spec in GPU_SPECS if key in device_name), None)


def assign_devices(device: str | None, num_ranks: int) -> list[str]:
    """The device of each of `num_ranks` instance processes, in rank order. device: "cpu"; "cuda"
    (one GPU per rank: cuda:0, cuda:1, ...); "cuda:i" (GPU i, for one process); None: "cuda"
    where torch sees a GPU, else "cpu". Raises ValueError for a layout that cannot run."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device: use cpu, cuda or cuda:<index>") from None
    if parsed.type == "cpu":
        return ["cpu"] * num_ranks
    if parsed.type != "cuda":
        raise ValueError(f"device {device!r}: minicake runs on cpu or cuda, not {parsed.type}")
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found == 0:
        raise ValueError(f"device {device!r}, but torch {torch.__version__} sees no CUDA GPU: use --device cpu")
    if parsed.index is not None:
        if parsed.index >= found:
            raise ValueError(f"device {device!r}: GPU index out of range, torch sees {found} GPU(s), "
                             f"cuda:0 to cuda:{found - 1}")
        if num_ranks > 1:
            raise ValueError(f"device {device!r} names one GPU, but {num_ranks} instance processes need one GPU "
                             f"each (NCCL cannot put two ranks on one GPU): use --device cuda, or --colocated")
        return [device]
    if num_ranks > found:
        raise ValueError(f"{num_ranks} instance processes need {num_ranks} GPUs (one each: NCCL cannot put two "
                         f"ranks on one GPU), found {found}: use --colocated, fewer instances "
                         f"(--prefill, --decode, --pipeline-stages), or --device cpu")
    return [f"cuda:{rank}" for rank in range(num_ranks)]
