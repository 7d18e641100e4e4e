"""Sampling parameters and the sampler: turn each sampled row of logits into one token.

`SamplingParams` follows vLLM's names and is validated when built, every field to a range the
sampler can hold. Temperature 0 (below 1e-5, as in vLLM) is greedy. The sampler runs on the logits' device
and draws its noise from a stateless hash of (seed, position, token id): a seeded request's
tokens depend on nothing else, on any device, and unseeded ones get a seed from the engine.
"""
import functools
import reprlib
import sys
from dataclasses import dataclass

import torch

# Every integer field fits torch's int64 (seeds as OpenAI documents them: int64).
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256  # each stop string is searched for after every token
# Temperatures below this are greedy (as in vLLM): dividing fp32 logits by them overflows.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    max_tokens: int = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check(_is_number(self.temperature) and 0 <= self.temperature <= sys.float_info.max,
               "temperature", self.temperature, "a finite number >= 0")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1,
               "top_p", self.top_p, "in (0, 1]")
        _check(_is_int64(self.top_k) and (self.top_k == -1 or self.top_k >= 0),
               "top_k", self.top_k, "-1 or 0 (off) or a positive 64-bit integer")
        _check(_is_int64(self.max_tokens) and self.max_tokens >= 1,
               "max_tokens", self.max_tokens, "a 64-bit integer >= 1")
        _check(len(self.stop) <= MAX_STOP_STRINGS and all(
                   isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop),
               "stop", self.stop, f"a non-empty string of at most {MAX_STOP_CHARS} characters "
               f"or a list of at most {MAX_STOP_STRINGS} of them")
        _check(all(_is_int64(t) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids", self.stop_token_ids, "a list of token ids >= 0")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "a bool")
        _check(self.seed is None or _is_int64(self.seed), "seed", self.seed,
               f"None or an integer in [{INT64_MIN}, {INT64_MAX}] (int64)")
        _check(_is_int(self.n) and self.n >= 1, "n", self.n, "an integer >= 1")
        if self.n != 1:
            raise ValueError(f"n={self.n}: minicake returns one completion per request; "
                             "send the prompt n times (with different seeds) instead")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_int64(x) -> bool:
    return _is_int(x) and INT64_MIN <= x <= INT64_MAX


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {expected}, got {reprlib.repr(value)}")


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], positions: list[int]) -> list[int]:
    """logits: [num_rows, vocab], one row per sequence that gets a token this step, on any device;
    seeds, positions: each row's seed and the position of the token it samples.

    Greedy rows take the argmax. Other rows are scaled by temperature, cut to top-k/top-p, and
    sampled with the exponential race (argmax of p / E, E ~ Exp(1)) over `exponential_noise`.
    Every row at once on the logits' device; only the sampled ids come back to the host.
    """
    assert logits.shape[0] == len(params) == len(seeds) == len(positions), "one params/seed/position per row"
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    if not all(p.greedy for p in params):
        device = logits.device
        # greedy rows divide by 1 (their temperature may be a denormal) and keep their argmax
        temperature = to_device([1.0 if p.greedy else p.temperature for p in params], torch.float32, device)
        x = _top_k_top_p(logits / temperature[:, None], [p.top_k for p in params], [p.top_p for p in params])
        noise = exponential_noise(to_device(seeds, torch.int64, device), to_device(positions, torch.int64, device),
                                  logits.shape[1])
        sampled = (torch.softmax(x, dim=-1) / noise).argmax(dim=-1)
        tokens = torch.where(to_device([p.greedy for p in params], torch.bool, device), tokens, sampled)
    return tokens.tolist()


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on `device`; on CUDA through pinned memory, without a host sync."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """x: [rows, vocab] logits; returns x with the cut-off tokens set to -inf."""
    if all(k <= 0 for k in top_k) and all(p >= 1 for p in top_p):
        return x
    vocab, device = x.shape[-1], x.device
    sorted_x, order = x.sort(dim=-1, descending=True)  # [rows, vocab]
    k = to_device([min(k, vocab) if k > 0 else vocab for k in top_k], torch.int64, device)
    cut = torch.arange(vocab, device=device)[None, :] >= k[:, None]  # beyond top-k
    # top-p: keep the smallest prefix whose mass reaches p (the token crossing p is kept)
    probs = torch.softmax(sorted_x.masked_fill(cut, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    cut |= mass_before >= to_device(top_p, x.dtype, device)[:, None]
    sorted_x = sorted_x.masked_fill(cut, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x)


# --- the noise: a counter-based hash, the same bits on every device -------------------------
# Values are 32-bit unsigned numbers held in int64 tensors; every operation keeps them in
# [0, 2**32), so products stay below 2**49 (no overflow) and >> shifts in zeros.
MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32, from 16-bit halves of c."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Chris Wellons' hash-prospector): a well-mixing bijection of 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=4)
def _token_keys(vocab: int, device: torch.device) -> torch.Tensor:
    """[vocab] int64: each token id hashed, the per-token half of every draw (built once)."""
    return _mix32(torch.arange(vocab, dtype=torch.int64, device=device))


def hash_bits(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """seeds, positions: [rows] int64 -> [rows, vocab] int64 in [0, 2**24): a hash of (seed,
    position, token id), the same bits on every device (integer ops only)."""
    key = _mix32((seeds & MASK32) ^ 0x9E3779B9)  # the low half of the seed, then the high half
    key = _mix32(key ^ ((seeds >> 32) & MASK32))
    key = _mix32(key ^ (positions & MASK32))  # [rows]
    return _mix32(key[:, None] ^ _token_keys(vocab, seeds.device)[None, :]) >> 8


def exponential_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """seeds, positions: [rows] int64 -> E: [rows, vocab] float32, Exp(1) draws that depend only on
    (seed, position, token id): E = -log(u), u from `hash_bits`, in (0, 1). A seeded request's
    tokens so depend on nothing else: not the batch, not the device, not which instance samples
    them (a prefill instance samples the first token, a decode instance the rest)."""
    u = (hash_bits(seeds, positions, vocab).float() + 0.5) * 2.0 ** -24  # exact in float32
    return -torch.log(u)
