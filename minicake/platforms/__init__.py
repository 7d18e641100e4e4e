"""Platforms: what makes the plain torch model fast on one kind of hardware, applied at load time.

`minicake/model/` is plain torch and runs as written. Once the weights are loaded, the engine
applies one platform, which turns some modules into their twins: subclasses with the same
parameters whose `forward` calls the platform's kernels and gives the same numbers.
- cpu (platforms/cpu/): C kernels (packed matmul, norm, RoPE, KV store, silu, decode
  attention), a CPU-shaped torch attention for prefill, decode graphs, glibc heap settings;
- triton (platforms/cuda.py): the Triton paged-attention and KV-store kernels of kernels/.
One setting chooses (`EngineConfig.kernels`): "auto" (triton on CUDA, cpu on a CPU), "triton"
(on a CPU too, through Triton's interpreter: the tests' view of the CUDA path) or "torch"
(no platform: every op is the model's own line).
"""
import logging

import torch
from torch import nn

from minicake.config import KERNELS

logger = logging.getLogger("minicake")


def apply_platform(model: nn.Module, device: torch.device, kernels: str) -> str:
    """Apply the platform `kernels` names to `model` (in place); returns the platform applied:
    "torch", "cpu" or "triton"."""
    assert kernels in KERNELS, f"kernels must be one of {KERNELS}, got {kernels!r}"
    if kernels == "torch":
        name = "torch"
    elif kernels == "triton" or device.type == "cuda":
        from minicake.platforms import cuda
        cuda.apply(model)
        name = "triton"
    else:
        from minicake.platforms import cpu
        cpu.apply(model)
        name = "cpu"
    logger.info("kernels: %s (%s)", name, {"torch": "the model's own torch ops",
                                           "triton": "Triton paged attention and KV store",
                                           "cpu": "C kernels where they build, CPU attention"}[name])
    return name


def swap_classes(model: nn.Module, twins: dict[type, type]) -> None:
    """Each module whose class is a key of `twins` becomes an instance of its twin: a subclass
    with the same parameters and buffers, so nothing is copied."""
    for module in model.modules():
        twin = twins.get(type(module))
        if twin is not None:
            assert issubclass(twin, type(module)), f"{twin.__name__} must subclass {type(module).__name__}"
            module.__class__ = twin
