
# %% [markdown]
# # Chapter 6: disaggregation, a prefill process and a decode process
#
# Prefill and decode want different things. Prefill of a long prompt is compute-bound and
# long; decode is memory-bound and wants a steady, short step for every running request
# (chapter 2). In one engine they interfere: a prefill chunk makes every decode in the same
# step wait (chapter 4's table). Mooncake runs them on separate instances: a *prefill
# instance* computes the prompt and its KV cache, a *decode instance* receives that KV cache
# and generates. Each side can then be sized and batched for its own SLO (TTFT for prefill,
# TBT for decode), at the price of moving the KV cache between them.
#
# The price is hidden by sending it *layer by layer* (docs/design.md, Layer-wise KV
# transfer): as soon as layer j has written a chunk's K/V, the prefill instance starts a
# non-blocking send of those blocks and computes layer j+1. When the last layer finishes,
# only its own send is still in flight.
# A send is a small fixed-size header (transfer id, layer, first block, number of blocks)
# and then the blocks as one tensor, over torch.distributed: gloo between CPU processes,
# NCCL between GPUs, the same code.
#
# The order of events for one request (docs/design.md, The life of one request):
# 1. the decode instance reserves the KV blocks first, so a transfer never arrives with
#    nowhere to land, and tells the prefill instance where to send;
# 2. the prefill instance prefills (chunked, prefix cache) and streams each layer's blocks;
# 3. it samples the first token and tells the decode instance;
# 4. once every layer has arrived, the decode instance adds the sequence to its running
#    batch as if it had prefilled it itself, and decodes.
#
# Files: `minicake/disagg/cluster.py` (`Cluster`: starts the processes, routes requests),
# `minicake/disagg/prefill_instance.py`, `minicake/disagg/decode_instance.py`,
# `minicake/disagg/transfer.py` (`KVSender`, `KVReceiver`), `minicake/disagg/launcher.py`.

# %%
import atexit
import statistics
import time

import torch

from minicake.llm import LLM
from minicake.model import ModelConfig, resolve_model
from minicake.sampling import SamplingParams

torch.set_num_threads(1)
# the engine settings of every deployment below: every process uses one thread, so the
# prefill compute is the same in every deployment
settings = dict(device="cpu", num_kv_blocks=96, block_size=16, max_num_batched_tokens=1024, num_threads=1,
                kv_transfer_timeout=60.0)
FIRST_TOKEN = SamplingParams(temperature=0.0, max_tokens=1)  # the request ends with its first token

# %% [markdown]
# ## Two deployments, side by side
#
# `LLM(prefill_instances=1, decode_instances=1)` starts a `Cluster` of one prefill and one
# decode process (each a program of its own, `python -m minicake.disagg.worker`, joined through
# torch.distributed's env:// rendezvous with gloo) and returns when both have loaded the model;
# `LLM.generate` then drives the cluster the way it drives an in-process engine (chapter 4).
# Nothing of this file runs again in them, so it needs no `if __name__ == "__main__":`. The
# second cluster is the same with `kv_transfer_layerwise=False`: every layer is sent only after
# the whole prompt is computed, the baseline that layer-wise sending is measured against.

# %%
def ttft(llm: LLM, prompt: list[int]) -> float:
    """Seconds from the request to its first token, as the caller sees it: with FIRST_TOKEN the
    request finishes with that token, so `generate` returns when it arrives."""
    start = time.perf_counter()
    out = llm.generate([prompt], FIRST_TOKEN, use_tqdm=False)[0]
    assert out.finish_reason == "length", f"no first token: {out.finish_reason}"
    return time.perf_counter() - start


t0 = time.perf_counter()
clusters = {
    "layer-wise": LLM(prefill_instances=1, decode_instances=1, **settings),
    "send-after": LLM(prefill_instances=1, decode_instances=1, kv_transfer_layerwise=False, **settings),
}
for llm in clusters.values():
    atexit.register(llm.close)  # stop the processes even if a check below fails
print(f"started 2 clusters (4 processes) in {time.perf_counter() - t0:.1f} s")

# %% [markdown]
# ## Check: the decode process generates what one engine generates
#
# The tokenizer runs in the caller; the instance processes see token ids. A greedy request
# through each cluster must produce the tokens that an in-process `Engine` (chapter 4)
# produces: the KV cache that crossed the process boundary is the one the prefill computed.

# %%
tok = clusters["layer-wise"].tokenizer
prompt = tok.encode("The three primary colours are red, yellow and")
greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
reference = LLM(**settings).generate([prompt], greedy, use_tqdm=False)[0].token_ids  # one engine, in process
for name, llm in clusters.items():
    tokens = llm.generate([prompt], greedy, use_tqdm=False)[0].token_ids
    assert tokens == reference, (name, tokens, reference)
print(f"engine, layer-wise and send-after clusters agree: {tok.decode(reference)!r}")

# %% [markdown]
# ## Measurement: what the transfer adds to TTFT
#
# TTFT at the caller is prefill compute + the KV transfer that has not overlapped with it
# + control messages (`ttft` above: the time `generate` takes for a request that ends with its
# first token). Each prompt length runs on both clusters in turn (twice; the median is
# shown), so a change in machine load hits both alike. `KV MiB` is what crosses per
# request: 2 (K, V) x 30 layers x 3 KV heads x 64 x 4 bytes per token.
#
# On one CPU host gloo moves tensors through local sockets, fast next to a CPU prefill, so
# the gap between the columns is small and noisy here; between GPUs, where prefill is far
# faster and the link matters more, hiding the transfer decides whether disaggregation pays.

# %%
mc = ModelConfig.from_dir(resolve_model("smollm2-135m"))
kv_bytes_per_token = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * 4
g = torch.Generator().manual_seed(0)
rows = []
for n in (128, 512):
    prompt = torch.randint(100, mc.vocab_size - 100, (n,), generator=g).tolist()
    times = {name: [] for name in clusters}
    for repeat in range(2):
        for name, llm in clusters.items():
            prompt_r = [repeat + 1] + prompt  # a fresh first block: no prefix-cache hit
            times[name].append(ttft(llm, prompt_r))
    rows.append((n, {name: statistics.median(t) for name, t in times.items()}))
print(f"{'prompt':>6} {'KV MiB':>7} {'TTFT layer-wise s':>17} {'TTFT send-after s':>17}")
for n, ttft in rows:
    print(f"{n:>6} {n * kv_bytes_per_token / 2**20:7.1f} {ttft['layer-wise']:17.3f} {ttft['send-after']:17.3f}")
print("(one thread per process, CPU shared with whatever else runs: compare the columns)")

# %%
for llm in clusters.values():
    llm.close()

# %% [markdown]
# ## What to read next
#
# - `minicake/model/llama.py`: `CausalLM.run_layers` is the model's one layer loop; a prefill
#   instance plugs itself into `Engine.step` (`Engine.serve_as_prefill`), and its
#   `after_layer` hook (`StageRunner.after_layer`, `minicake/disagg/pipeline.py`) starts the
#   sends of each layer's new blocks.
# - `minicake/disagg/transfer.py`: why every wait runs in a helper thread (a gloo work that
#   times out is ended), and why the header comes first (a gloo receive buffer that is too
#   small aborts the process).
# - `benchmarks/disagg.py`: the same comparison with more lengths, the colocated baseline
#   and the pipelined prefill of chapter 7.
# - Chapter 7 (`07_pipeline_prefill.py`): one long prompt, several prefill processes.
