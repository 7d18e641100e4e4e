"""The one attention call of the model: store the new K/V in the paged cache, then attend.

Every engine step hands the model a flat batch: all sequences' new tokens concatenated,
plus an `AttentionMetadata` saying where each sequence starts, how long it is in the cache
and which blocks hold it. The model never sees sequences, only this layout, so the paged
cache plugs in without touching the rest of the model. `PagedAttention` computes it with the
plain torch references of kernels/reference.py; a platform (minicake/platforms) turns it into
its twin that calls the Triton kernels (CUDA) or the CPU's C kernels.
"""
from dataclasses import dataclass

import torch
from torch import nn

from minicake.kernels.reference import paged_attention_ref, store_kv_ref


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative counts of new tokens
    context_lens: torch.Tensor  # [num_seqs] int32, tokens in the cache after this step (cached + new)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, -1 padded
    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot of each new token, -1 = do not store


class PagedAttention(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata):
        """q: [num_tokens, num_q_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
        k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]. Returns like q."""
        store_kv_ref(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention_ref(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                   meta.query_start_loc, self.scale)
