"""Sampling parameters and the sampler: turn each sampled row of logits into one token.

`SamplingParams` follows vLLM's names and is validated when built, every field to a range the
sampler can hold. Temperature 0 (below 1e-5, as in vLLM) is greedy. A request with a `seed`
owns a `torch.Generator`, and its row is sampled from that generator alone, so its tokens do
not depend on which other requests share the batch.
"""
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


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None], default: torch.Generator) -> list[int]:
    """logits: [num_rows, vocab] fp32, one row per sequence that gets a token this step.

    Greedy rows take the argmax. Other rows are scaled by temperature, cut to top-k/top-p,
    and sampled with the exponential race (argmax of p / E, E ~ Exp(1)), the noise drawn
    from the row's own generator when it has one, else from the engine's `default`.
    """
    assert logits.shape[0] == len(params) == len(generators), "one params/generator per row"
    tokens = logits.argmax(dim=-1).tolist()
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    # x: [len(rows), vocab]
    x = logits[rows] / torch.tensor([[params[i].temperature] for i in rows], dtype=logits.dtype)
    x = _top_k_top_p(x, [params[i].top_k for i in rows], [params[i].top_p for i in rows])
    probs = torch.softmax(x, dim=-1)
    for r, i in enumerate(rows):
        noise = torch.empty_like(probs[r]).exponential_(generator=generators[i] or default)
        tokens[i] = int((probs[r] / noise).argmax())
    return tokens


def _top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """x: [rows, vocab] logits; returns x with the cut-off tokens set to -inf."""
    if all(k <= 0 for k in top_k) and all(p >= 1 for p in top_p):
        return x
    vocab = x.shape[-1]
    sorted_x, order = x.sort(dim=-1, descending=True)  # [rows, vocab]
    k = torch.tensor([k if k > 0 else vocab for k in top_k]).clamp(max=vocab)
    cut = torch.arange(vocab)[None, :] >= k[:, None]  # beyond top-k
    # top-p: keep the smallest prefix whose mass reaches p (the token crossing p is kept)
    probs = torch.softmax(sorted_x.masked_fill(cut, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    cut |= mass_before >= torch.tensor(top_p, dtype=x.dtype)[:, None]
    sorted_x = sorted_x.masked_fill(cut, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x)
