# %% [markdown]
# # Chapter 3: the paged-attention kernel, one tile at a time
#
# Chapter 2 attended through block tables in plain torch: gather a sequence's K/V blocks into
# a contiguous copy, then a matmul and a softmax. On a GPU that copy is the expensive part
# (decode is memory-bound), so minicake's CUDA path is one Triton kernel that reads K/V
# straight out of the paged cache, with no copy and no materialized score matrix. (On the
# CPU the decode tokens get the same treatment from a short C loop, `platforms/cpu/kernels.c`.)
#
# How `minicake/kernels/paged_attention.py` splits the work:
# - A *program* owns one query tile: BLOCK_Q new tokens of one sequence times the GROUP
#   query heads that share one KV head (rows of the tile are (token, head-in-group) pairs),
#   so every K/V tile it loads serves the whole group (grouped-query attention).
# - It walks the sequence's keys BLOCK_N at a time. For each key position it looks up the
#   physical block in the block table (`block_table[pos // BLOCK_SIZE]`) and the offset in
#   it (`pos % BLOCK_SIZE`): that gather is all paging costs.
# - It masks causally by absolute position (a prefill chunk on top of cached tokens sees the
#   cache plus its own earlier tokens) and stops at its last position.
# - It never holds all scores at once: an *online softmax* keeps, per row, the running max
#   `m_i`, the running denominator `l_i` and the running numerator `acc`, rescaling them
#   whenever a new tile raises the max.
# - For decode at small batch and long context, the key range is split over several
#   programs and a second small kernel merges their (m, l, acc) states (flash-decoding).
#
# On a machine without CUDA the kernel runs in Triton's interpreter, which executes the
# program in numpy on the CPU: slow, so the shapes here are tiny, but it is the same kernel.
# `TRITON_INTERPRET=1` must be set before triton is imported, hence the first cell.

# %%
import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import time  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from minicake.kernels.paged_attention import launch_config, paged_attention  # noqa: E402
from minicake.kernels.reference import paged_attention_ref, store_kv_ref  # noqa: E402
from minicake.kernels.store_kv import store_kv  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count()))
device = "cuda" if torch.cuda.is_available() else "cpu"
print(f"device {device}, Triton interpreter: {os.environ.get('TRITON_INTERPRET') == '1'}")

# %% [markdown]
# ## The online softmax, in plain torch
#
# The one idea the kernel rests on, shown on a single row of scores: fold the keys in tiles,
# keeping only (m, l, acc). When a tile brings a larger max, everything summed so far is
# rescaled by exp(m_old - m_new). The result equals softmax over all keys at once. (The
# kernel does the same in base 2 with `exp2`, and keeps one (m, l, acc) per row of its tile.)

# %%
gen = torch.Generator().manual_seed(0)
scores = torch.randn(100, generator=gen) * 3  # one query's scores against 100 keys
values = torch.randn(100, 8, generator=gen)  # [keys, head_dim]
m, l, acc = torch.tensor(float("-inf")), torch.tensor(0.0), torch.zeros(8)
for start in range(0, 100, 32):  # BLOCK_N = 32 keys per tile
    s, v = scores[start:start + 32], values[start:start + 32]
    m_new = torch.maximum(m, s.max())
    p = torch.exp(s - m_new)  # this tile's weights under the new max
    alpha = torch.exp(m - m_new)  # rescales what was summed under the old max
    l = l * alpha + p.sum()
    acc = acc * alpha + p @ v
    m = m_new
online = acc / l
full = scores.softmax(0) @ values
print(f"online softmax over 4 tiles vs softmax over all: max diff {(online - full).abs().max():.1e}")
assert torch.allclose(online, full, atol=1e-5)

# %% [markdown]
# ## A small paged batch
#
# Two sequences in one call, the mix the engine's steps produce (chapter 4):
# - `decode`: 40 tokens already cached, 1 new token;
# - `chunk`: 23 tokens cached, 9 new tokens (a prefill chunk on top of a cached prefix).
#
# Shapes like SmolLM2's attention, only narrower: 2 KV heads, 3 query heads per KV head,
# head_dim 32, blocks of 16 slots. The physical blocks are a random permutation, and every
# slot no sequence owns holds NaN, so a kernel that read a wrong slot would return NaN.
# `store_kv` (the Triton KV store) writes every token's K/V into its slot: the check against
# `store_kv_ref` shows the two stores agree.

# %%
num_kv_heads, group, head_dim, block_size = 2, 3, 32, 16
seqs = {"decode": (40, 1), "chunk": (23, 9)}  # name: (cached tokens, new tokens)
context_lens = [cached + new for cached, new in seqs.values()]
blocks_per_seq = [-(-n // block_size) for n in context_lens]
num_blocks = sum(blocks_per_seq) + 2
physical = torch.randperm(num_blocks, generator=gen).to(torch.int32)
block_tables = torch.full((len(seqs), max(blocks_per_seq)), -1, dtype=torch.int32)  # [num_seqs, max_blocks]
cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
k_cache, v_cache = torch.full(cache_shape, float("nan")), torch.full(cache_shape, float("nan"))
k_ref, v_ref = k_cache.clone(), v_cache.clone()
ks, vs, used = [], [], 0
for s, (n, nb) in enumerate(zip(context_lens, blocks_per_seq)):
    block_tables[s, :nb] = physical[used:used + nb]
    used += nb
    k = torch.randn(n, num_kv_heads, head_dim, generator=gen)  # [context_len, num_kv_heads, head_dim]
    v = torch.randn(n, num_kv_heads, head_dim, generator=gen)
    pos = torch.arange(n)
    slot_mapping = block_tables[s, pos // block_size].long() * block_size + pos % block_size  # [context_len]
    store_kv(k.to(device), v.to(device), k_cache, v_cache, slot_mapping)  # Triton
    store_kv_ref(k, v, k_ref, v_ref, slot_mapping)  # torch
    ks.append(k)
    vs.append(v)
assert torch.equal(k_cache.nan_to_num(7.0), k_ref.nan_to_num(7.0)), "Triton and torch KV stores differ"
assert torch.equal(v_cache.nan_to_num(7.0), v_ref.nan_to_num(7.0))
q_lens = [new for _, new in seqs.values()]
q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen)  # [num_tokens, num_q_heads, head_dim]
query_start_loc = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)  # [num_seqs + 1]
context_lens_t = torch.tensor(context_lens, dtype=torch.int32)  # [num_seqs]
print(f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}")
print(f"block_tables\n{block_tables}\ncontext_lens {context_lens}, query_start_loc {query_start_loc.tolist()}")

# %% [markdown]
# ## The launch
#
# `launch_config` picks the tile sizes from the shapes and dtype alone: a batch where every
# sequence brings one token gets 16-row tiles; anything with a prefill gets 128 rows in bf16
# (64 in fp32, to fit shared memory), BLOCK_Q tokens x GROUP heads padded to a power of two,
# and BLOCK_N keys per step. The grid is
# `num_tokens // BLOCK_Q + num_seqs` query tiles (an upper bound: each program finds its
# sequence by binary search over `query_start_loc`, and spare programs return at once)
# x `num_kv_heads` x `num_splits`.

# %%
block_m, block_q, block_n, num_warps = launch_config(sum(q_lens), len(seqs), group, q.dtype)
num_q_tiles = sum(q_lens) // block_q + len(seqs)
print(f"BLOCK_M {block_m} rows = BLOCK_Q {block_q} tokens x GROUP {group} heads (padded), BLOCK_N {block_n}, "
      f"{num_warps} warps; grid = ({num_q_tiles} query tiles, {num_kv_heads} KV heads, splits)")
start = time.perf_counter()
out = paged_attention(q, k_cache, v_cache, block_tables, context_lens_t, query_start_loc)  # [num_tokens, num_q_heads, head_dim]
kernel_s = time.perf_counter() - start
print(f"out {tuple(out.shape)}, any NaN: {bool(out.isnan().any())}")

# %% [markdown]
# ## Check: the kernel equals two torch computations
#
# 1. `paged_attention_ref`, minicake's own torch version (the CPU path of chapter 2).
# 2. Plain dense causal attention over each sequence's *contiguous* K/V, written here with
#    `F.scaled_dot_product_attention`: no blocks at all. Token i of a chunk of q_len new
#    tokens sits at position context_len - q_len + i and sees keys 0..that position.
#
# Then a flash-decoding split: the same call with the key range cut over 2 programs per
# query tile must give the same output.

# %%
ref = paged_attention_ref(q, k_ref, v_ref, block_tables, context_lens_t, query_start_loc)
dense = []
for s, (n, q_len) in enumerate(zip(context_lens, q_lens)):
    qs = q[query_start_loc[s]:query_start_loc[s + 1]].transpose(0, 1)  # [num_q_heads, q_len, head_dim]
    k = ks[s].repeat_interleave(group, 1).transpose(0, 1)  # [num_q_heads, context_len, head_dim]
    v = vs[s].repeat_interleave(group, 1).transpose(0, 1)
    visible = torch.arange(n)[None, :] <= torch.arange(n - q_len, n)[:, None]  # [q_len, context_len]
    dense.append(F.scaled_dot_product_attention(qs, k, v, attn_mask=visible).transpose(0, 1))
dense = torch.cat(dense)  # [num_tokens, num_q_heads, head_dim]
print(f"max |kernel - reference| {(out - ref).abs().max():.1e}, max |kernel - dense| {(out - dense).abs().max():.1e}")
assert torch.allclose(out, ref, atol=1e-4) and torch.allclose(out, dense, atol=1e-4)
split = paged_attention(q, k_cache, v_cache, block_tables, context_lens_t, query_start_loc, num_splits=2)
print(f"max |2 KV splits - 1 split| {(split - out).abs().max():.1e}")
assert torch.allclose(split, out, atol=1e-4)

# %% [markdown]
# ## Measurement
#
# On a CPU this only times the interpreter (numpy emulating every program), which says
# nothing about the kernel's speed; the CPU's real path is its platform
# (`minicake/platforms/cpu/`: C decode attention, a CPU-shaped torch attention for prefill). The number that matters, the share of the GPU's memory bandwidth that decode
# achieves at long context, is measured by `benchmarks/kernel_bench.py` on a CUDA machine; the
# cell below runs a small version of it only there.

# %%
start = time.perf_counter()
paged_attention_ref(q, k_ref, v_ref, block_tables, context_lens_t, query_start_loc)
ref_s = time.perf_counter() - start
print(f"this batch: Triton kernel {kernel_s * 1e3:.1f} ms ({'interpreted' if device == 'cpu' else 'incl. compile'}), "
      f"torch reference {ref_s * 1e3:.1f} ms")

if device == "cuda":
    batch, context = 64, 4096  # decode: 64 sequences, one new token each, 4096 cached tokens
    nb = context // block_size
    kc = torch.randn(batch * nb, block_size, 8, 128, device=device, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    tables = torch.arange(batch * nb, device=device, dtype=torch.int32).view(batch, nb)
    lens = torch.full((batch,), context, device=device, dtype=torch.int32)
    qd = torch.randn(batch, 32, 128, device=device, dtype=torch.bfloat16)
    qsl = torch.arange(batch + 1, device=device, dtype=torch.int32)
    paged_attention(qd, kc, vc, tables, lens, qsl)  # compile
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        paged_attention(qd, kc, vc, tables, lens, qsl)
    torch.cuda.synchronize()
    t = (time.perf_counter() - t0) / 20
    print(f"decode, batch {batch}, context {context}: {t * 1e6:.0f} us, "
          f"{2 * kc.numel() * kc.element_size() / t / 1e9:.0f} GB/s of K/V read")
else:
    print("GPU measurement skipped: no CUDA device (run benchmarks/kernel_bench.py on a GPU)")

# %% [markdown]
# ## What to read next
#
# - `minicake/kernels/paged_attention.py`: `_paged_attention_kernel` is the program described
#   above; `_online_softmax_step` is the torch loop of the first cell in Triton.
# - `tests/test_kernel_paged_attention.py`: the shapes that break kernels (GQA 1/3/4, block
#   boundaries, one-token sequences, bf16).
# - `benchmarks/kernel_bench.py` and `benchmarks/kernel_registers.py`: speed on a GPU, and how the
#   tile sizes were chosen without one.
# - Chapter 4 (`04_continuous_batching.py`): who decides which tokens go into each call.
