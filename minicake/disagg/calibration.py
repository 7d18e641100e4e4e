"""Start-up timings that check the Conductor's cost profile against the machine that serves.

Before it says `Ready`, a prefill instance (stage 0 of its group) times PREFILL_ROUNDS prefills
of each of PREFILL_TOKENS and a decode instance a few decode steps of one request, after a
warm-up run; the parent rescales the profile to them (`cost_model.calibrate`). CPU instances start timing
together, once all have loaded (they share the cores). Random prompts, prefix caching off while
timing: no block of them stays keyed, so none is reported to the Conductor.
"""
import random
import time
from contextlib import contextmanager

import torch.distributed as dist

from minicake.engine import Engine
from minicake.sampling import SamplingParams

PREFILL_TOKENS, PREFILL_ROUNDS = (64, 192), 2  # 1.3 s of prefill on the bundled model, one thread here
WARMUP_TOKENS = 16
DECODE_PROMPT, DECODE_WARMUP, DECODE_STEPS = 64, 2, 5  # warm-up steps record the decode graphs


def startup_timings(role: str, stage: int, engine: Engine) -> tuple[list, list]:
    """(prefill samples, decode samples) as `cost_model.calibrate` takes them; none for other roles.
    Every rank of the cluster calls it once, after building its engine."""
    if dist.get_backend() == "gloo":  # no instance times itself next to another still loading its model
        dist.barrier()  # bounded: the parent ends every instance when one fails to start in time
    rng = random.Random(engine.config.seed)
    if role == "prefill" and stage == 0:
        return time_prefills(engine, rng), []
    if role == "decode":
        return [], time_decode_steps(engine, rng)
    return [], []


def time_prefills(engine: Engine, rng: random.Random) -> list[tuple[int, int, float]]:
    """(prompt tokens, 0 cached, seconds until its first token) of PREFILL_ROUNDS prompts of each size."""
    samples = []
    sizes = sorted({min(n, _max_prompt(engine, 1)) for n in PREFILL_TOKENS})
    with _uncached(engine):
        _run(engine, _prompt(engine, WARMUP_TOKENS, rng), max_tokens=1)
        for n in sizes * PREFILL_ROUNDS:
            start = time.perf_counter()
            _run(engine, _prompt(engine, n, rng), max_tokens=1)
            samples.append((n, 0, time.perf_counter() - start))
    return samples


def time_decode_steps(engine: Engine, rng: random.Random) -> list[tuple[int, int, float]]:
    """(batch size 1, context tokens, seconds) of DECODE_STEPS steps of one request, after its
    prefill (in chunks, maybe) and DECODE_WARMUP steps."""
    max_tokens = 1 + DECODE_WARMUP + DECODE_STEPS
    n = min(DECODE_PROMPT, _max_prompt(engine, max_tokens))
    samples, generated = [], 0
    with _uncached(engine):
        engine.add_request("calibration", _prompt(engine, n, rng),
                           SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            outputs = engine.step()
            if generated > DECODE_WARMUP:  # a decode step of a sequence of n + generated tokens
                samples.append((1, n + generated, time.perf_counter() - start))
            generated += sum(len(o.new_token_ids) for o in outputs)
    return samples


def _max_prompt(engine: Engine, new_tokens: int) -> int:
    """The longest prompt that leaves room for `new_tokens` in max_model_len and the cache."""
    room = min(engine.max_model_len, engine.block_manager.num_blocks * engine.config.block_size)
    return max(1, room - new_tokens)


def _prompt(engine: Engine, n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(engine.model_config.vocab_size) for _ in range(n)]


def _run(engine: Engine, prompt: list[int], max_tokens: int) -> None:
    engine.add_request("calibration", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()


@contextmanager
def _uncached(engine: Engine):
    """Prefix caching off, and the prefix-cache counters as they were, once the timings are done."""
    bm = engine.block_manager
    enabled, counters = bm.enable_prefix_caching, (bm.prefix_queries_tokens, bm.prefix_hits_tokens)
    bm.enable_prefix_caching = False
    try:
        yield
    finally:
        bm.enable_prefix_caching = enabled
        bm.prefix_queries_tokens, bm.prefix_hits_tokens = counters
