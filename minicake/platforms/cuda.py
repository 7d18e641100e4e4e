"""The CUDA platform: the model's attention runs the Triton kernels of minicake/kernels/.

`PagedAttention` becomes `TritonPagedAttention`: the KV store and the paged-attention kernel
(prefill chunks and decodes in one launch). Everything else stays the model's torch ops
(cuBLAS matmuls already run at the hardware's speed).
"""
from minicake.kernels.paged_attention import paged_attention
from minicake.kernels.store_kv import store_kv
from minicake.model.attention import AttentionMetadata, PagedAttention
from minicake.platforms import swap_classes


class TritonPagedAttention(PagedAttention):
    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata):
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                               meta.query_start_loc, self.scale)


def apply(model) -> None:
    swap_classes(model, {PagedAttention: TritonPagedAttention})
