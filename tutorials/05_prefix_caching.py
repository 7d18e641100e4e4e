# %% [markdown]
# # Chapter 5: prefix caching with chained block keys
#
# Many prompts start the same way: a system prompt, a few-shot preamble, the earlier turns
# of a conversation. Their K/V for that shared prefix are identical, so an engine can
# compute them once and let later requests point their block tables at the same blocks.
# This is the heart of Mooncake: its whole cluster is organized around where cached
# prefixes live (chapter 8).
#
# To find a shared prefix quickly, every *full* block gets a key that names the block *and
# everything before it*: key(block i) = hash(key(block i-1), tokens of block i). Equal key i
# means equal prefix up to the end of block i, so a prefix match is a walk over a prompt's
# keys that stops at the first miss, one dictionary lookup per block. The block keeps its
# token ids too, so a hash collision is detected, never served. The same function names
# blocks in the local prefix cache, the KV pool and the Conductor (docs/design.md, Block keys).
#
# A freed block keeps its key and stays findable until the allocator needs the space
# (least recently freed first): a cache that costs nothing while memory is free.
#
# Files: `minicake/cache/block_keys.py` (the one function), `minicake/cache/block_manager.py`
# (`allocate_prefix`, `cache_full_blocks`, `free`), `minicake/sim/pool_model.py` (the
# host pool's model, used below on a trace).

# %%
import os
import time
from pathlib import Path

from minicake.cache.block_keys import block_keys
from minicake.config import EngineConfig
from minicake.engine import Engine
from minicake.sampling import SamplingParams
from minicake.sim.pool_model import KVPoolModel
from minicake.sim.trace import TRACE_BLOCK_SIZE, load_trace

REPO = Path(__file__).resolve().parent.parent
FIGURES = Path(os.environ.get("MINICAKE_FIGURES", REPO / "tutorials" / "figures"))

# %% [markdown]
# ## Keys
#
# Two token sequences that share their first 40 tokens, cut into blocks of 16: the first two
# blocks (32 tokens) are full and equal, so their keys are equal; block 2 differs in its
# last 8 tokens, and from there on every key differs, even where the tokens agree again.

# %%
shared = list(range(100, 140))  # 40 shared tokens
a = shared + [1] * 24
b = shared + [2] * 8 + [1] * 16
keys_a, keys_b = block_keys(a, 16), block_keys(b, 16)
print(f"{len(a)} tokens -> {len(keys_a)} keys; equal keys: {[ka == kb for ka, kb in zip(keys_a, keys_b)]}")
assert [ka == kb for ka, kb in zip(keys_a, keys_b)] == [True, True, False, False]
assert block_keys(a[:-1], 16) == keys_a[:3], "a partial last block gets no key"

# %% [markdown]
# ## The engine reuses a shared system prompt
#
# An engine with prefix caching on (the default). The first request computes its whole
# prompt; the next ones share the system prompt and find its full blocks in the cache.
# `StepOutput.num_cached_tokens` says how many prompt tokens were served from the cache; the
# engine's counters give the token-weighted hit rate. The last token of a prompt is never
# served from the cache: its logits are needed to sample the first output token.

# %%
settings = dict(num_kv_blocks=64, block_size=16, max_num_batched_tokens=512, num_threads=min(2, os.cpu_count()))
engine = Engine(EngineConfig(**settings))
tok = engine.tokenizer
system = ("You are a careful assistant for a bakery. Answer in one short sentence. The bakery opens at "
          "seven, sells sourdough, rye and croissants, closes on Mondays, and takes orders by phone. ") * 2
questions = ["When do you open?", "Do you sell rye bread?", "Are you open on Monday?"]
greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def generate(engine: Engine, request_id: str, text: str) -> tuple[list[int], int, float]:
    """(output tokens, cached prompt tokens, seconds to the first token) of one request run alone."""
    engine.add_request(request_id, tok.encode(text), greedy)
    tokens, cached, ttft, t0 = [], 0, 0.0, time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if not tokens:
                ttft = time.perf_counter() - t0
            tokens += out.new_token_ids
            cached = out.num_cached_tokens
    return tokens, cached, ttft


with_cache = {}
for i, q in enumerate(questions):
    n = len(tok.encode(system + q))
    with_cache[q] = generate(engine, f"q{i}", system + q)
    print(f"{q!r}: {n} prompt tokens, {with_cache[q][1]} from the cache, first token after {with_cache[q][2] * 1e3:.0f} ms")
stats = engine.stats()
print(f"token-weighted hit rate: {stats['prefix_hits_tokens']} / {stats['prefix_queries_tokens']} = "
      f"{stats['prefix_hits_tokens'] / stats['prefix_queries_tokens']:.2f}")
assert with_cache[questions[0]][1] == 0 and all(with_cache[q][1] > 0 for q in questions[1:])

# %% [markdown]
# ## Check: a hit changes nothing but time
#
# The same requests through an engine built with prefix caching off
# (`EngineConfig(enable_prefix_caching=False)`, otherwise the same settings): every prompt is
# computed in full, and the greedy tokens must be the same. The time to the first token
# shows what the cache saved (prefill of the shared part); on a CPU shared with other work,
# compare the two columns rather than trusting either alone.

# %%
del engine  # one model in memory at a time
engine_off = Engine(EngineConfig(**settings, enable_prefix_caching=False))
print(f"{'question':>26} {'cached':>6} {'TTFT ms (hit)':>13} {'TTFT ms (off)':>13}")
for i, q in enumerate(questions):
    tokens, cached, ttft = generate(engine_off, f"off{i}", system + q)
    assert tokens == with_cache[q][0], (q, tokens, with_cache[q][0])
    assert cached == 0
    print(f"{q:>26} {with_cache[q][1]:6} {with_cache[q][2] * 1e3:13.0f} {ttft * 1e3:13.0f}")
print("same tokens with and without the prefix cache")

# %% [markdown]
# ## Hit rate against capacity, on a real trace
#
# How much cache is enough? The Mooncake conversation trace names each 512-token block of
# every prompt by a hash id, so the hit rate of a cache of a given size can be replayed
# without any model: each request reuses the leading blocks the pool still holds, then
# stores all of its blocks, evicting least recently used (or least frequently used) ones.
# This is `KVPoolModel`, the simulator's model of a prefill instance's host pool. The trace
# ships with minicake (`minicake/traces/`); `load_trace("conversation")` reads it.

# %%
trace = load_trace("conversation", limit=3000)


def hit_rate(capacity_blocks: int | None, policy: str) -> float:
    """Token-weighted prefix hit rate of the trace through one pool of this many blocks."""
    pool = KVPoolModel(None if capacity_blocks is None else capacity_blocks * TRACE_BLOCK_SIZE,
                       TRACE_BLOCK_SIZE, policy)
    hit = total = 0
    for e in trace:
        keys, n = e.request.block_keys, e.request.prompt_len
        hit += min(pool.match_len(keys) * TRACE_BLOCK_SIZE, n - 1)
        total += n
        pool.access(keys)
    return hit / total


capacities = [100, 300, 1_000, 3_000, 10_000, 30_000]
rates = {policy: [hit_rate(c, policy) for c in capacities] for policy in ("lru", "lfu")}
unlimited = hit_rate(None, "lru")
print(f"conversation trace, {len(trace)} requests; token-weighted hit rate by pool capacity:")
for c, lru, lfu in zip(capacities, rates["lru"], rates["lfu"]):
    print(f"  {c:>6} blocks ({c * TRACE_BLOCK_SIZE / 1e6:5.1f} M tokens): LRU {lru:.3f}  LFU {lfu:.3f}")
print(f"  unlimited: {unlimited:.3f}")
assert rates["lru"] == sorted(rates["lru"]) and rates["lru"][-1] <= unlimited + 1e-9, "more room never hurts LRU here"

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(7, 4))
for policy, r in rates.items():
    ax.plot([c * TRACE_BLOCK_SIZE for c in capacities], r, marker="o", label=policy.upper())
ax.axhline(unlimited, color="k", ls="--", lw=0.8, label="unlimited")
ax.set_xscale("log")
ax.set_xlabel("pool capacity (tokens, log scale)")
ax.set_ylabel("prefix hit rate (token-weighted)")
ax.set_title(f"conversation trace, first {len(trace)} requests, one pool")
ax.legend()
fig.tight_layout()
FIGURES.mkdir(parents=True, exist_ok=True)
fig.savefig(FIGURES / "05_hit_rate_vs_capacity.png", dpi=100)
print(f"wrote {FIGURES / '05_hit_rate_vs_capacity.png'}")

# %% [markdown]
# ## What to read next
#
# - `minicake/cache/block_manager.py`: `allocate_prefix` walks the keys and checks token ids;
#   `free` puts a sequence's tail blocks first in line for eviction, so a prefix loses its
#   end before its beginning.
# - `benchmarks/pool_hit_rate.py`: the capacity study on whole traces.
# - Chapter 6 (`06_disaggregation.py`): prefill and decode in separate processes, and the
#   K/V that must travel between them.
