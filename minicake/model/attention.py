"""The one attention call of the model: store the new K/V in the paged cache, then attend.

Every engine step hands the model a flat batch: all sequences' new tokens concatenated,
plus an `AttentionMetadata` saying where each sequence starts, how long it is in the cache
and which blocks hold it. The model never sees sequences, only this layout, so the paged
cache and the Triton kernel plug in without touching the model. The backend is picked
here and nowhere else: Triton kernels on CUDA; on CPU the plain-torch references, with the
KV store and the decode tokens handed to the C kernels of `kernels/cpu_kernels.py` ("auto",
where they build and the cache is float32) or kept in torch ("torch").
"""
from dataclasses import dataclass

import torch

from minicake.kernels import cpu_kernels
from minicake.kernels.reference import paged_attention_ref, store_kv_ref


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative counts of new tokens
    context_lens: torch.Tensor  # [num_seqs] int32, tokens in the cache after this step (cached + new)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, -1 padded
    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot of each new token, -1 = do not store


BACKENDS = ("auto", "torch", "triton")
_backend = "auto"


def set_attention_backend(name: str) -> None:
    """Force the Triton kernels or the torch references ("auto": Triton on CUDA, C + torch on CPU)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def use_triton(device: torch.device) -> bool:
    return _backend == "triton" or (_backend == "auto" and device.type == "cuda")


def attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    """q: [num_tokens, num_q_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]. Returns like q."""
    if use_triton(q.device):
        from minicake.kernels.paged_attention import paged_attention
        from minicake.kernels.store_kv import store_kv
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                               meta.query_start_loc, scale)
    use_c = _backend == "auto" and cpu_kernels.usable(k_cache)
    (cpu_kernels.store_kv if use_c else store_kv_ref)(k, v, k_cache, v_cache, meta.slot_mapping)
    return paged_attention_ref(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                               meta.query_start_loc, scale,
                               decode_attention=cpu_kernels.decode_attention if use_c else None)
