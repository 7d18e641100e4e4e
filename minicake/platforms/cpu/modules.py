"""The CPU twins of the model's modules: the same parameters, a forward that calls C.

Each twin checks that the C kernels can take its input (a float32 CPU tensor, the library
built, the layout the kernel reads) and otherwise runs the model's own torch forward, so a
twin is never wrong, only sometimes no faster. `PackedLinear` holds its weight rearranged for
the C matmul (`pack_weights`, as vLLM's `process_weights_after_loading` rearranges weights).
"""
from torch import nn

from minicake.model.attention import AttentionMetadata, PagedAttention
from minicake.model.llama import RMSNorm, SiluAndMul
from minicake.model.rope import RotaryEmbedding
from minicake.platforms.cpu import attention, kernels


class CpuRMSNorm(RMSNorm):
    def forward(self, x, residual=None):
        if kernels.usable(x) and (residual is None or residual.is_contiguous()) and \
                (x.is_contiguous() or (residual is None and kernels.heads_side_by_side(x))):
            return kernels.rms_norm(x, self.weight, self.eps, residual)
        return super().forward(x, residual)


class CpuSiluAndMul(SiluAndMul):
    def forward(self, x):
        return kernels.silu_and_mul(x) if kernels.usable(x) else super().forward(x)


class CpuRotaryEmbedding(RotaryEmbedding):
    def forward(self, positions, q, k):
        """Rotates q and k in place (one C call) where their heads lie side by side."""
        if kernels.usable(q) and kernels.heads_side_by_side(q) and kernels.heads_side_by_side(k):
            return kernels.rope_(q, k, positions, *self._table(q.device))
        return super().forward(positions, q, k)


class CpuPagedAttention(PagedAttention):
    """The KV store and the decode tokens in C where it takes the cache; prefill chunks (and
    decodes without C) in the CPU-shaped torch attention of attention.py."""

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata):
        use_c = kernels.usable(k_cache)
        if use_c:
            kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        else:
            attention.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return attention.paged_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens,
                                         meta.query_start_loc, self.scale,
                                         decode_attention=kernels.decode_attention if use_c else None)


class PackedLinear(nn.Linear):
    """nn.Linear whose `weight` is the panels [ceil(n / 32), k, 32] of `kernels.pack_weight`: here
    at least as fast as torch's matmul at every batch size, 1.4-2.6x at 8-64 rows (a decode step)."""

    def forward(self, x):
        return kernels.packed_linear(x, self.weight, self.out_features, self.bias)


def pack_weights(model) -> None:
    """Turn every nn.Linear of a float32 model into a PackedLinear, all panels in one buffer in
    huge pages. A head tied to the embedding gets its own packed copy as `lm_head` (vocab_size
    x hidden_size floats more): the checkpoint has no such tensor."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if model.lm_head is None:
        model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False,
                                  device="meta")
        model.lm_head.weight = model.embed_tokens.weight
        linears.append(model.lm_head)
    sizes = [kernels.packed_numel(m.weight) for m in linears]
    buffer = kernels.huge_page_empty(sum(sizes))
    for module, out in zip(linears, buffer.split(sizes)):
        packed = kernels.pack_weight(module.weight, out)
        module.weight = nn.Parameter(packed, requires_grad=False)
        module.__class__ = PackedLinear
