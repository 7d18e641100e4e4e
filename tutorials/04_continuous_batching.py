# %% [markdown]
# # Chapter 4: continuous batching and chunked prefill
#
# Chapter 2 showed that a decode step costs about the same for 1 sequence as for 16: the
# weights are read once either way. So an engine wants as many sequences in every step as
# memory allows. *Continuous batching* (Orca, vLLM) forms the batch anew at every step:
# a request that finishes leaves at once, a request that arrives joins at the next step,
# nobody waits for the slowest member of a fixed batch.
#
# A long prompt is the problem case: prefilling 4000 tokens in one step makes every running
# request wait that long for its next token. *Chunked prefill* gives each step a token
# budget (`max_num_batched_tokens`): decodes (one token each) are scheduled first, and a
# prompt takes whatever budget is left, over as many steps as it needs, mixed with the
# decodes of others. The paged kernel of chapter 3 handles such mixed batches in one call.
#
# Files: `minicake/sched/scheduler.py` (`Scheduler.schedule`: the whole policy, ~40 lines),
# `minicake/engine.py` (`Engine.step`: schedule -> run -> postprocess),
# `minicake/llm.py` (`LLM.generate`, the offline API built on `Engine`).

# %%
import os
import time

from minicake.config import EngineConfig
from minicake.engine import Engine
from minicake.sampling import SamplingParams

threads = min(2, os.cpu_count())
# a small engine: 48 blocks of 16 tokens, at most 64 tokens per step, prefix caching off
# (chapter 5 turns it on)
engine = Engine(EngineConfig(num_kv_blocks=48, block_size=16, max_num_batched_tokens=64,
                             enable_prefix_caching=False, num_threads=threads))
tok = engine.tokenizer

# %% [markdown]
# ## Watching the steps
#
# Two short prompts start; a long one (about 150 tokens) arrives at step 3 while they
# decode; a fourth short one arrives at step 5. `Engine.add_request` returns the request's
# `Sequence` (`minicake/sched/sequence.py`), the scheduler's view of it; after every
# `engine.step()` the table shows what each request did in that step, read from its
# `num_computed_tokens`:
# `P64` = a prefill chunk of 64 tokens, `D` = one decode token, `.` = waiting or done.
# The step's token count never exceeds the budget of 64, and the short requests keep
# decoding while the long prompt is prefilled in chunks beside them.

# %%
greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
long_prompt = " ".join(["The history of bread begins in the Neolithic era, when people first ground grain."] * 9)
arrivals = {0: [("a", "The capital of France is"), ("b", "Water boils at")],
            3: [("long", long_prompt)], 5: [("c", "My favourite fruit is")]}
prompts = {rid: text for batch in arrivals.values() for rid, text in batch}
seqs, outputs, step_times, rows = {}, {rid: [] for rid in prompts}, [], []
step = 0
while step == 0 or engine.has_unfinished_requests():
    for rid, text in arrivals.get(step, []):
        seqs[rid] = engine.add_request(rid, tok.encode(text), greedy)  # the request's Sequence
    before = {rid: s.num_computed_tokens for rid, s in seqs.items()}
    t0 = time.perf_counter()
    for out in engine.step():
        outputs[out.request_id] += out.new_token_ids
    step_times.append(time.perf_counter() - t0)
    done = {rid: s.num_computed_tokens - before[rid] for rid, s in seqs.items()}
    cells = {rid: "." if n == 0 else ("D" if n == 1 and before[rid] >= s.num_prompt_tokens else f"P{n}")
             for (rid, n), s in zip(done.items(), seqs.values())}
    rows.append((step, sum(done.values()), cells))
    step += 1

names = list(prompts)
print(f"prompt tokens: { {rid: len(tok.encode(t)) for rid, t in prompts.items()} }")
print(f"{'step':>4} {'tokens':>6} " + " ".join(f"{n:>5}" for n in names) + f" {'ms':>7}")
for (i, num_tokens, cells), t in zip(rows, step_times):
    print(f"{i:>4} {num_tokens:>6} " + " ".join(f"{cells.get(n, '.'):>5}" for n in names) + f" {t * 1e3:7.0f}")
assert all(num_tokens <= 64 for _, num_tokens, _ in rows), "a step exceeded the token budget"
chunk_steps = [cells for _, _, cells in rows if cells.get("long", ".").startswith("P")]
assert len(chunk_steps) >= 3, "the long prompt should be prefilled in several chunks"
assert any(c.get("a") == "D" for c in chunk_steps), "decodes should run beside the prefill chunks"

# %% [markdown]
# A detail worth seeing in the table: a decode step of a sequence is a "prefill of one
# token" to the model. In the step where a prompt's last chunk runs, the runner samples its
# first token; the step after, the sequence decodes. Sequences that are mid-prompt sample
# nothing (`ModelRunner.execute` only sends finished rows through the LM head).

# %% [markdown]
# ## Check: batching changes nothing but speed
#
# Each request, run alone through the same engine, must produce the same greedy tokens as
# it did inside the mixed, chunked batches above.

# %%
def run_alone(rid: str) -> list[int]:
    engine.add_request(f"{rid}-alone", tok.encode(prompts[rid]), greedy)
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
    return tokens


for rid in prompts:
    alone = run_alone(rid)
    assert alone == outputs[rid], (rid, alone, outputs[rid])
    print(f"{rid:>5}: {tok.decode(outputs[rid])!r} (same alone and batched)")

# %% [markdown]
# ## Measurement: batched vs one at a time
#
# Three short requests, 8 tokens each: all three added to the engine at once (what
# `LLM.generate` does), against the same three run one after another. The batched run does
# three decodes per step for little more than the price of one.

# %%
params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
batch_prompts = [tok.encode(f"Item number {i} on the list is") for i in range(3)]

t0 = time.perf_counter()
for i, ids in enumerate(batch_prompts):
    engine.add_request(f"batch-{i}", ids, params)
while engine.has_unfinished_requests():
    engine.step()
batched_s = time.perf_counter() - t0

t0 = time.perf_counter()
for i, ids in enumerate(batch_prompts):
    engine.add_request(f"seq-{i}", ids, params)
    while engine.has_unfinished_requests():
        engine.step()
sequential_s = time.perf_counter() - t0
num_tokens = len(batch_prompts) * params.max_tokens
print(f"{len(batch_prompts)} requests x {params.max_tokens} tokens: batched {batched_s:.2f} s ({num_tokens / batched_s:.0f} tokens/s), "
      f"one at a time {sequential_s:.2f} s ({num_tokens / sequential_s:.0f} tokens/s), "
      f"speed-up {sequential_s / batched_s:.1f}x")

# %% [markdown]
# ## What to read next
#
# - `minicake/sched/scheduler.py`: what happens when a sequence needs a block and none is
#   free (preemption by recompute), and why decodes go first.
# - `minicake/llm.py`: `LLM("smollm2-135m").generate(prompts, SamplingParams(...))`, the
#   same loop as above behind vLLM's offline API.
# - Chapter 5 (`05_prefix_caching.py`): when two requests share a prefix, compute it once.
