"""The Llama-family decoder (Llama, Qwen2, Qwen3) over the flat, paged batch layout.

One `CausalLM` serves all three architectures with flags from `ModelConfig`: Qwen2 adds
q/k/v biases, Qwen3 a per-head RMSNorm on q and k, and any of them may tie the output
head to the embedding. Every step sees all sequences' new tokens concatenated (no padding,
no batch dimension) and attends through the one paged `attention` call, so prefill chunks
and decode tokens share a batch. The layers are exposed one by one (`embed`, `layers`,
`final_norm`), and `run_layers` takes a layer range and per-layer hooks, so a prefill
instance can act after each layer and a pipeline stage run its own layers (docs/design.md,
Layer-wise KV transfer; Chunked pipeline-parallel prefill).
This is plain torch and runs as written; a platform (minicake/platforms) may turn modules
into their twins that call faster kernels, with the same parameters and the same numbers.
"""
import torch
import torch.nn.functional as F
from torch import nn

from minicake.model.attention import AttentionMetadata, PagedAttention
from minicake.model.config import ModelConfig
from minicake.model.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; given a residual, adds it first and returns the new residual."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual=None):
        if residual is not None:
            x = residual = x + residual
        out = self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)
        return out if residual is None else (out, residual)


class StackedLinear(nn.Linear):
    """Projections of the same input stacked into one Linear (q/k/v; gate/up), as vLLM and
    nano-vllm do: one product, a third or half as many calls per layer; the output holds the
    parts side by side. Checkpoints keep the parts apart; `part_rows` says which rows of the
    weight (and bias) each one fills.
    parts: checkpoint name -> output size, in order, e.g. {"gate_proj": 1536, "up_proj": 1536}."""

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool):
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts = parts

    def part_rows(self) -> dict[str, slice]:
        rows, start = {}, 0
        for name, size in self.parts.items():
            rows[name], start = slice(start, start + size), start + size
        return rows


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, q_size, kv_size = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = config.attention_bias
        self.qkv_proj = StackedLinear(hidden, {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}, bias=bias)
        # Llama/Qwen3 put the attention bias on o_proj too; Qwen2 only on q/k/v
        self.o_proj = nn.Linear(q_size, hidden, bias=bias and config.architecture != "Qwen2ForCausalLM")
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.rotary = rotary
        self.attn = PagedAttention(scale=self.head_dim ** -0.5)

    def forward(self, positions, x, meta: AttentionMetadata, k_cache, v_cache):
        n = x.shape[0]  # x: [num_tokens, hidden_size]
        qkv = self.qkv_proj(x).view(n, -1, self.head_dim)  # [num_tokens, num_heads + 2 * num_kv_heads, head_dim]
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim] (views)
        q, k, v = qkv.split_with_sizes([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        o = self.attn(q, k, v, k_cache, v_cache, meta)  # [num_tokens, num_heads, head_dim]
        return self.o_proj(o.reshape(n, self.num_heads * self.head_dim))


class SiluAndMul(nn.Module):
    def forward(self, x):
        """x: [num_tokens, 2 * d], gate then up (the stacked projection) -> silu(gate) * up [num_tokens, d]."""
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = StackedLinear(config.hidden_size, {"gate_proj": size, "up_proj": size}, bias=False)
        self.act = SiluAndMul()
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))  # gate_up: [num_tokens, 2 * intermediate_size]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = Attention(config, rotary)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, meta: AttentionMetadata, k_cache, v_cache):
        """hidden, residual: [num_tokens, hidden_size]; residual is None before the first layer.
        Returns this layer's output and the running residual stream, not yet added together."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta, k_cache, v_cache)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class CausalLM(nn.Module):
    """Parameter names follow the Hugging Face checkpoints without their "model." prefix,
    except the stacked projections (`StackedLinear`: qkv_proj, gate_up_proj)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings,
                                 config.rope_scaling)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, rotary) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else \
            nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)  # [num_tokens, hidden_size]

    def final_norm(self, hidden, residual):
        return self.norm(hidden, residual)[0]

    def forward(self, input_ids, positions, meta: AttentionMetadata, kv_caches, before_layer=None):
        """input_ids, positions: [num_tokens] int64; kv_caches: one (k_cache, v_cache) per layer.
        Returns [num_tokens, hidden_size] after the final norm."""
        hidden, residual = self.run_layers(self.embed(input_ids), None, positions, meta, kv_caches,
                                           before_layer=before_layer)
        return self.final_norm(hidden, residual)

    def run_layers(self, hidden, residual, positions, meta: AttentionMetadata, kv_caches, layers: range | None = None,
                   before_layer=None, after_layer=None):
        """The one loop over the decoder layers. hidden, residual: [num_tokens, hidden_size]
        (residual None before layer 0); returns both after the last layer of `layers` (default:
        all; a pipeline stage runs its own range). before_layer(i) / after_layer(i), when given,
        run around layer i: the KV pool loads layer i's blocks before it, a prefill instance
        sends layer i's new K/V after it."""
        assert len(kv_caches) == len(self.layers), f"{len(kv_caches)} KV caches for {len(self.layers)} layers"
        for i in layers if layers is not None else range(len(self.layers)):
            if before_layer is not None:
                before_layer(i)
            k_cache, v_cache = kv_caches[i]
            hidden, residual = self.layers[i](positions, hidden, residual, meta, k_cache, v_cache)
            if after_layer is not None:
                after_layer(i)
        return hidden, residual

    def compute_logits(self, hidden):
        """hidden: [n, hidden_size] (only the rows to sample from) -> [n, vocab_size] float32."""
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        return F.linear(hidden, self.embed_tokens.weight).float()

