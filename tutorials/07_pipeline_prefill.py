# %% [markdown]
# # Chapter 7: chunked pipeline-parallel prefill for long prompts
#
# A 100k-token prompt takes long to prefill on one instance, and TTFT is all prefill. To
# use several machines for one prompt, Mooncake splits the model's layers into stages, one
# process each, and cuts the prompt into chunks (docs/design.md, Chunked pipeline-parallel
# prefill): stage 0 computes chunk c on its layers while stage 1 computes chunk c-1 on the
# next layers, and so on, passing hidden states forward. With S stages and C chunks, the
# prompt takes about (C + S - 1) chunk-times of one stage instead of C x S: close to S times
# faster when C >> S.
#
# Why chunks and not sequence parallelism? Stages talk only to their neighbour, once per
# chunk (the hidden states), instead of at every layer, and a short prompt (one chunk)
# simply runs through the stages at no extra cost. Each stage keeps the K/V of its own
# layers and streams them to the decode instance itself (chapter 6), so the decode side
# receives from every stage. The output must be identical to unpipelined prefill: the
# same chunks of the same layers are computed, only by different processes.
#
# Files: `minicake/disagg/pipeline.py` (`stage_layers`, `StageBatch`, `StageRunner`),
# `minicake/disagg/prefill_instance.py` (stage 0 runs `Engine.step`; later stages follow),
# `minicake/disagg/cluster.py` (`Cluster(..., pipeline_stages=S)`, which
# `LLM(..., prefill_instances=1, pipeline_stages=S)` starts).

# %%
import atexit
import statistics
import time

import torch

from minicake.disagg.pipeline import stage_layers
from minicake.llm import LLM
from minicake.sampling import SamplingParams

torch.set_num_threads(1)
CHUNK = 128  # max_num_batched_tokens: a prompt of n tokens is prefilled in ceil(n / 128) chunks
# the engine settings of every deployment below; one thread per process
settings = dict(device="cpu", num_kv_blocks=96, block_size=16, max_num_batched_tokens=CHUNK, num_threads=1,
                kv_transfer_timeout=60.0)
print(f"30 layers over 2 stages: {[(r.start, r.stop - 1) for r in (stage_layers(30, 2, s) for s in range(2))]}")
print(f"30 layers over 4 stages: {[len(stage_layers(30, 4, s)) for s in range(4)]} layers each")


def ttft(llm: LLM, prompt: list[int]) -> float:
    """Chapter 6's time to first token, as the caller sees it: the request ends with that token."""
    start = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)[0]
    assert out.finish_reason == "length", f"no first token: {out.finish_reason}"
    return time.perf_counter() - start


# %% [markdown]
# ## A 2-stage prefill group next to a plain prefill instance
#
# `LLM(prefill_instances=1, pipeline_stages=2)` starts a `Cluster` with a prefill group of two
# processes (stage 0: layers 0-14, stage 1: layers 15-29) and one decode process; the other
# deployment is chapter 6's 1 prefill + 1 decode. `LLM.generate` drives a cluster the way it
# drives an in-process engine (chapter 4). Every process gets one thread, so on a machine with
# at least two free cores the two stages really run at the same time.

# %%
t0 = time.perf_counter()
clusters = {"1 stage": LLM(prefill_instances=1, decode_instances=1, **settings),
            "2 stages": LLM(prefill_instances=1, decode_instances=1, pipeline_stages=2, **settings)}
for llm in clusters.values():
    atexit.register(llm.close)  # stop the processes even if a check below fails
print(f"started 2 clusters (5 processes) in {time.perf_counter() - t0:.1f} s")

# %% [markdown]
# ## Check: pipelined prefill computes what plain prefill computes
#
# A prompt of 300 tokens is 3 chunks. Greedy tokens through the 2-stage group, through the
# 1-stage cluster, and through an in-process `Engine` with the same chunk size must agree.

# %%
tok = clusters["1 stage"].tokenizer
prompt = tok.encode("Once upon a time, " * 60)[:300]
greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
reference = LLM(**settings).generate([prompt], greedy, use_tqdm=False)[0].token_ids  # one engine, in process
for name, llm in clusters.items():
    tokens = llm.generate([prompt], greedy, use_tqdm=False)[0].token_ids
    assert tokens == reference, (name, tokens, reference)
print(f"{len(prompt)}-token prompt in {-(-len(prompt) // CHUNK)} chunks: engine, 1 stage and 2 stages agree")

# %% [markdown]
# ## Measurement: TTFT of a short and a long prompt
#
# A 1-chunk prompt gains nothing from the pipeline (its chunk passes stage 0, then stage
# 1: the same work in the same order, plus a hand-over). A 4-chunk prompt keeps both stages
# busy at once after the first chunk. TTFT is the time `generate` takes for a request that
# ends with its first token (`ttft` above). Both clusters take turns on each prompt, twice;
# the median is shown. The ideal speed-up with S stages and C chunks is C x S / (C + S - 1).

# %%
g = torch.Generator().manual_seed(0)
print(f"{'prompt':>6} {'chunks':>6} {'TTFT 1 stage s':>14} {'TTFT 2 stages s':>15} {'speed-up':>8} {'ideal':>5}")
for n in (CHUNK, 4 * CHUNK):
    prompt = torch.randint(100, tok.vocab_size - 100, (n,), generator=g).tolist()
    times = {name: [] for name in clusters}
    for repeat in range(2):
        for name, llm in clusters.items():
            prompt_r = [repeat + 1] + prompt[1:]  # a fresh first block: no prefix-cache hit
            times[name].append(ttft(llm, prompt_r))
    one, two = statistics.median(times["1 stage"]), statistics.median(times["2 stages"])
    chunks = -(-n // CHUNK)
    print(f"{n:>6} {chunks:>6} {one:14.2f} {two:15.2f} {one / two:8.2f} {chunks * 2 / (chunks + 1):5.2f}")
print("(one thread per process; with fewer than 3 free cores, or other work on the CPU, the stages "
      "share cores and single runs scatter around the ideal, both ways)")

# %%
for llm in clusters.values():
    llm.close()

# %% [markdown]
# ## What to read next
#
# - `minicake/disagg/pipeline.py`: `StageRunner.send_hidden` waits only for the previous
#   batch's send, so at most two chunks sit between neighbours.
# - `minicake/disagg/prefill_instance.py`: stage 0 runs the ordinary `Engine.step` with itself
#   plugged in (`Engine.serve_as_prefill`): `begin` decides which blocks each step sends,
#   `after_layer` sends them, `end` passes the hidden states to the next stage; a later stage's
#   `work` runs its layers (`StageRunner.run_layers`) and the last one samples (`_sample`).
# - `tests/test_disagg.py`: pipelined and disaggregated output equal the colocated engine's.
# - Chapter 8 (`08_conductor.py`): many prefill and decode instances, and who gets which request.
