"""The CPU platform: C kernels, a CPU-shaped torch attention, decode graphs, heap settings.

`apply(model)` packs the linear weights for the C matmul (float32 models, where the C kernels
build) and turns the norm, activation, RoPE and attention modules into their CPU twins
(modules.py). The engine's runner then records small decode steps as decode graphs
(decode_graph.py) where the C kernels take the KV cache.
"""
import torch

from minicake.model.attention import PagedAttention
from minicake.model.llama import RMSNorm, SiluAndMul
from minicake.model.rope import RotaryEmbedding
from minicake.platforms import swap_classes
from minicake.platforms.cpu import kernels
from minicake.platforms.cpu.heap import give_back_freed_memory, keep_freed_memory_in_heap
from minicake.platforms.cpu.modules import (CpuPagedAttention, CpuRMSNorm, CpuRotaryEmbedding,
                                            CpuSiluAndMul, pack_weights)


def apply(model) -> None:
    if model.embed_tokens.weight.dtype == torch.float32 and kernels.library() is not None:
        pack_weights(model)
    give_back_freed_memory()  # the unpacked weights
    keep_freed_memory_in_heap()  # from here on: the steps' temporaries
    swap_classes(model, {RMSNorm: CpuRMSNorm, SiluAndMul: CpuSiluAndMul, RotaryEmbedding: CpuRotaryEmbedding,
                         PagedAttention: CpuPagedAttention})
