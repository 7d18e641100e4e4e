# %% [markdown]
# # Chapter 2: the KV cache, paging, block tables and slot mapping
#
# To generate token t+1 the model needs, at every layer, the keys and values of tokens
# 0..t. Recomputing them each step would make generating n tokens cost O(n^2) forward work,
# so an engine keeps them: the KV cache. After the prompt is processed once (prefill), each
# decode step runs the model on one new token per sequence and appends that token's K/V.
#
# Sequences grow one token at a time and nobody knows in advance how long they get.
# Reserving `max_model_len` slots per sequence wastes most of the memory; vLLM's answer,
# which minicake follows, is paging: the cache is a pool of fixed-size *blocks* of
# `block_size` token slots, a sequence owns a list of blocks (its *block table*), and a
# token at position p lives in slot `block_table[p // block_size] * block_size + p % block_size`.
# The *slot mapping* of a step lists that slot for every new token; attention reads a
# sequence's keys through its block table, wherever its blocks happen to be.
#
# Files: `minicake/cache/kv_cache.py` (the tensors), `minicake/cache/block_manager.py` (who
# owns which block), `minicake/sched/sequence.py` (a request's tokens and block table),
# `minicake/model/runner.py` (`ModelRunner.prepare`: a batch of sequences to flat tensors).

# %%
import os
import time

import torch

from minicake.cache.block_manager import BlockManager
from minicake.cache.kv_cache import allocate_kv_caches, bytes_per_block
from minicake.model import AttentionMetadata, Tokenizer, load_model, resolve_model
from minicake.model.runner import ModelRunner
from minicake.platforms import apply_platform
from minicake.sampling import SamplingParams
from minicake.conductor.cost_model import KV_BYTES_PER_TOKEN
from minicake.sched.scheduler import Scheduler
from minicake.sched.sequence import Sequence

torch.set_num_threads(min(2, os.cpu_count()))
path = resolve_model("smollm2-135m")
model = load_model(path, device="cpu")
apply_platform(model, torch.device("cpu"), "auto")  # the CPU's kernels, as the engine does (chapter 1)
tokenizer = Tokenizer.from_dir(path)
config = model.config

# %% [markdown]
# ## How big is the KV cache?
#
# Per token and layer the cache holds one key and one value vector per KV head. SmolLM2
# shares 3 KV heads among its 9 query heads (grouped-query attention), which cuts the cache
# to a third of what 9 KV heads would need.

# %%
per_token = bytes_per_block(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                            block_size=1, dtype=torch.float32)
print(f"smollm2-135m, fp32: {per_token} bytes of K/V per token = 2 x {config.num_hidden_layers} layers "
      f"x {config.num_key_value_heads} KV heads x {config.head_dim} x 4 bytes")
print(f"  a 4096-token conversation: {4096 * per_token / 2**20:.0f} MiB")
print(f"a 70B model (80 layers, 8 KV heads of 128, bf16): {KV_BYTES_PER_TOKEN // 1024} KiB per token, "
      f"{4096 * KV_BYTES_PER_TOKEN / 2**30:.2f} GiB for 4096 tokens")

# %% [markdown]
# ## Blocks, block tables, slot mapping
#
# A tiny cache: 12 blocks of 4 slots. Two short prompts go through the
# scheduler (chapter 4), which asks the `BlockManager` for enough blocks for each prompt.
# `ModelRunner.prepare` then turns the scheduled sequences into the model's flat batch.

# %%
block_size, num_blocks = 4, 12
kv_caches = allocate_kv_caches(config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads,
                               config.head_dim, torch.float32, torch.device("cpu"))
block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
scheduler = Scheduler(block_manager, max_num_seqs=8, max_num_batched_tokens=256)
runner = ModelRunner(model, kv_caches, block_size, torch.device("cpu"), seed=0)

greedy = SamplingParams(temperature=0.0, max_tokens=8)
prompts = ["The capital of France is", "Water boils at a temperature of"]
seqs = [Sequence(f"seq{i}", tokenizer.encode(p), greedy) for i, p in enumerate(prompts)]
for seq in seqs:
    scheduler.add(seq)

step_seqs = scheduler.schedule()
input_ids, positions, meta = runner.prepare(step_seqs)
for seq in step_seqs:
    print(f"{seq.request_id}: {len(seq)} tokens, block table {seq.block_table}")
print(f"input_ids {tuple(input_ids.shape)}, positions {positions.tolist()}")
print(f"query_start_loc {meta.query_start_loc.tolist()}, context_lens {meta.context_lens.tolist()}")
print(f"block_tables (-1 = padding)\n{meta.block_tables}")
print(f"slot_mapping {meta.slot_mapping.tolist()}")


# %% [markdown]
# ## Decoding: one token per sequence per step
#
# `step()` below drives the pieces the way `Engine.step` does (`minicake/engine.py`):
# schedule, run the model (`ModelRunner.execute` samples one token per sequence that reached
# its last token), then record the computed tokens and append the sampled one. Watch the
# block tables grow: a sequence takes a new block only when its last one is full, and
# blocks of the two sequences interleave in the pool.

# %%
def step(seqs_to_run):
    tokens = runner.execute(seqs_to_run)
    # the scheduler counts the computed tokens and returns the sequences that reached their end
    for seq, token in zip(scheduler.advance(seqs_to_run), tokens):
        seq.append_token(token)


step(step_seqs)  # the prefill step scheduled above
for _ in range(greedy.max_tokens - 1):
    step_seqs = scheduler.schedule()
    _, _, meta = runner.prepare(step_seqs)
    step(step_seqs)
print(f"last decode step: query_start_loc {meta.query_start_loc.tolist()} (one new token each), "
      f"context_lens {meta.context_lens.tolist()}, slot_mapping {meta.slot_mapping.tolist()}")
for seq in seqs:
    print(f"{seq.request_id}: block table {seq.block_table}: "
          f"{tokenizer.decode(seq.token_ids[:seq.num_prompt_tokens])!r} + "
          f"{tokenizer.decode(seq.output_token_ids)!r}")

# %% [markdown]
# ## Check: the cache changes nothing but speed
#
# Greedy tokens made with the paged cache (prefill once, then one token per step, K/V read
# through interleaved blocks) must equal what chapter 1's plain forward pass predicts when
# it recomputes the whole sequence from scratch in a fresh, contiguous cache.

# %%
def full_recompute_argmax(token_ids):
    n = len(token_ids)
    nb = -(-n // block_size)
    caches = allocate_kv_caches(config.num_hidden_layers, nb, block_size, config.num_key_value_heads,
                                config.head_dim, torch.float32, torch.device("cpu"))
    m = AttentionMetadata(torch.tensor([0, n], dtype=torch.int32), torch.tensor([n], dtype=torch.int32),
                          torch.arange(nb, dtype=torch.int32)[None], torch.arange(n))
    with torch.inference_mode():
        hidden = model(torch.tensor(token_ids), torch.arange(n), m, caches)
        return model.compute_logits(hidden).argmax(-1).tolist()  # the next token after every position


for seq in seqs:
    predicted = full_recompute_argmax(seq.token_ids[:-1])[seq.num_prompt_tokens - 1:]
    assert predicted == seq.output_token_ids, (seq.request_id, predicted, seq.output_token_ids)
print("paged decode == full recomputation, token for token")

# %% [markdown]
# ## Measurement: decode is memory-bound
#
# A decode step reads every weight once (513 MiB in fp32 here) to do 2 FLOPs per weight per
# sequence in the batch. At batch 1 that is half a FLOP per byte read, far below what any
# processor can do per byte its memory delivers (a few FLOPs per byte on a CPU, hundreds on
# an H100). So the step time is set by reading the weights, and adding sequences to the
# batch is nearly free until the arithmetic catches up: that is why engines batch decodes
# from many requests (chapter 4), and why Mooncake gives decode its own instances (chapter 6).
# The table times decode steps at batch 1 and 8 (contexts of ~16 tokens, so the weights,
# not the KV cache, dominate the bytes).

# %%
def decode_step_time(batch: int, repeats: int = 2) -> float:
    bm = BlockManager(64, 16, enable_prefix_caching=False)
    caches = allocate_kv_caches(config.num_hidden_layers, 64, 16, config.num_key_value_heads,
                                config.head_dim, torch.float32, torch.device("cpu"))
    sched = Scheduler(bm, max_num_seqs=batch, max_num_batched_tokens=1024)
    run = ModelRunner(model, caches, 16, torch.device("cpu"), seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=repeats + 2, ignore_eos=True)
    batch_seqs = [Sequence(f"b{i}", torch.randint(0, config.vocab_size, (12,)).tolist(), params)
                  for i in range(batch)]
    for s in batch_seqs:
        sched.add(s)
    scheduled = sched.schedule()  # the prefill, untimed
    toks = run.execute(scheduled)
    for s, tok in zip(sched.advance(scheduled), toks):
        s.append_token(tok)
    best = float("inf")
    for _ in range(repeats):
        scheduled = sched.schedule()
        assert len(scheduled) == batch and all(s.num_scheduled_tokens == 1 for s in scheduled)
        t0 = time.perf_counter()
        toks = run.execute(scheduled)
        best = min(best, time.perf_counter() - t0)
        for s, tok in zip(sched.advance(scheduled), toks):
            s.append_token(tok)
    return best


print(f"{'batch':>5} {'FLOP/byte':>9} {'step ms':>8} {'tokens/s':>9} {'GB/s of weights':>16}")
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
for batch in (1, 8):
    t = decode_step_time(batch)
    intensity = batch * 2 / 4  # 2 FLOPs per sequence for every 4-byte fp32 weight read
    print(f"{batch:>5} {intensity:9.1f} {t * 1e3:8.1f} {batch / t:9.1f} {weight_bytes / t / 1e9:16.2f}")
print("(absolute numbers depend on what else the CPU is doing; compare the rows)")

# %% [markdown]
# ## What to read next
#
# - `minicake/cache/block_manager.py`: `allocate_slots` (blocks on demand), `free`, and the
#   prefix-caching half that chapter 5 explains.
# - `minicake/kernels/reference.py`: `paged_attention_ref`, attention that gathers K/V
#   through block tables in plain torch, one sequence and one head at a time (the model's own
#   attention; on a CPU the engine runs `minicake/platforms/cpu/attention.py` and the C decode
#   kernel of `minicake/platforms/cpu/kernels.c`, which reads K/V from the blocks without the copy).
# - Chapter 3 (`03_paged_attention_kernel.py`): the same computation as one Triton kernel.
