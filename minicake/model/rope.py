"""Rotary position embedding (RoPE), including the "llama3" frequency scaling.

Tokens of a flat batch sit at arbitrary positions (a decode token at 900 next to a prefill
chunk at 0..63), so cos/sin are computed once for every position up to
max_position_embeddings and gathered by `positions`. The rotation is the Hugging Face
"rotate half" layout; GGUF's interleaved layout is undone when importing (gguf_import.py).
"""
import math

import torch
from torch import nn


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """[head_dim // 2] float32 angular speeds, as transformers computes them."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # llama3: slow (long-wavelength) components are divided by `factor`, fast ones kept,
    # and those in between interpolated smoothly
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Shared by all layers; holds no weights, only the cos/sin table (built on first use)."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, scaling: dict | None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.max_positions = max_positions
        self._cos_sin = None  # [max_positions, head_dim] each, float32, on the model's device
        self._step = (None, None)  # (positions, its cos/sin): every layer of a step asks for the same rows

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos_sin is None or self._cos_sin[0].device != device:
            inv_freq = inv_frequencies(self.head_dim, self.theta, self.scaling).to(device)
            pos = torch.arange(self.max_positions, device=device, dtype=torch.float32)
            freqs = pos[:, None] * inv_freq[None, :]  # [max_positions, head_dim // 2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
            self._cos_sin = (emb.cos(), emb.sin())
        return self._cos_sin

    def forward(self, positions, q, k):
        """positions: [num_tokens]; q: [num_tokens, num_q_heads, head_dim]; k: [num_tokens, num_kv_heads, head_dim]."""
        if self._step[0] is not positions:
            cos_table, sin_table = self._table(q.device)
            cos = cos_table[positions][:, None, :].to(q.dtype)  # [num_tokens, 1, head_dim]
            sin = sin_table[positions][:, None, :].to(q.dtype)
            self._step = (positions, (cos, sin))
        cos, sin = self._step[1]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
