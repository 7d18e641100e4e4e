"""The Triton paged-attention kernel equals the torch reference, and the reference equals a plain
dense causal attention over contiguous K/V. On CPU the kernel runs in the Triton interpreter
(tests/conftest.py), on a GPU natively (benchmarks/gpu_check.sh)."""
from dataclasses import dataclass

import pytest
import torch

from minicake.kernels.paged_attention import default_num_splits, paged_attention
from minicake.kernels.reference import paged_attention_ref, store_kv_ref
from minicake.model.attention import AttentionMetadata, PagedAttention
from minicake.platforms.cuda import TritonPagedAttention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = dict(atol=1e-4, rtol=1e-4)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


@dataclass
class PagedBatch:
    args: tuple  # (q, k_cache, v_cache, block_tables, context_lens, query_start_loc)
    ks: list  # per sequence, contiguous K: [context_len, num_kv_heads, head_dim]
    vs: list


def make_batch(seqs, group=3, num_kv_heads=2, head_dim=64, block_size=16, dtype=torch.float32):
    """seqs: (num_cached, num_new) per sequence. Physical blocks are a random permutation, and
    every slot no sequence owns holds NaN, so reading one poisons the output."""
    gen = torch.Generator().manual_seed(len(seqs) * 1000 + group)
    context_lens = [cached + new for cached, new in seqs]
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 2
    physical = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    block_tables = torch.full((len(seqs), max(blocks_per_seq) + 1), -1, dtype=torch.int32)
    ks, vs, used = [], [], 0
    for s, (context_len, num) in enumerate(zip(context_lens, blocks_per_seq)):
        block_tables[s, :num] = physical[used:used + num]
        used += num
        k = torch.randn(context_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(context_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(context_len)
        store_kv_ref(k, v, k_cache, v_cache, block_tables[s, pos // block_size].long() * block_size + pos % block_size)
        ks.append(k)
        vs.append(v)
    q = torch.randn(sum(new for _, new in seqs), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    query_start_loc = torch.tensor([0] + [new for _, new in seqs]).cumsum(0).to(torch.int32)
    args = (q, k_cache, v_cache, block_tables, torch.tensor(context_lens, dtype=torch.int32), query_start_loc)
    return PagedBatch(tuple(t.to(DEVICE) for t in args), ks, vs)


def dense_causal_attention(q, k, v, scale):
    """q: [q_len, num_q_heads, head_dim], the last q_len positions of k, v: [context_len, num_kv_heads, head_dim]."""
    q_len, context_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    q, k, v = (t.float().transpose(0, 1) for t in (q, k, v))  # [heads, tokens, head_dim]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # [num_q_heads, context_len, head_dim]
    scores = (q @ k.transpose(1, 2)) * scale  # [num_q_heads, q_len, context_len]
    q_pos = torch.arange(context_len - q_len, context_len)
    future = torch.arange(context_len)[None, :] > q_pos[:, None]  # [q_len, context_len]
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    return (probs @ v).transpose(0, 1)  # [q_len, num_q_heads, head_dim]


MIXED = [(37, 1), (0, 20), (32, 9), (31, 1), (0, 1)]  # decode, prefill, chunk on a prefix, ends on a block, one token
BATCHES = {
    "decode_only": [(40, 1), (15, 1), (63, 1), (0, 1)],
    "prefill_only": [(0, 17), (0, 32), (0, 5)],
    "mixed": MIXED,
    "chunk_on_cached_prefix": [(48, 20), (16, 7)],
    "ends_on_block_boundary": [(31, 1), (16, 16), (0, 64)],
    "one_token_sequence": [(0, 1)],
    "chunk_spans_several_query_tiles": [(20, 70)],  # group 4: 32 tokens per query tile
}


LONG_CHUNKS = [(0, 300), (40, 200), (37, 1)]  # prefills spanning several of the CPU attention's query tiles


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("seqs", [MIXED, LONG_CHUNKS], ids=["mixed", "long_chunks"])
def test_reference_equals_dense_causal_attention(group, seqs):
    batch = make_batch(seqs, group=group)
    q, query_start_loc = batch.args[0], batch.args[5].tolist()
    out = paged_attention_ref(*batch.args)
    for s, (k, v) in enumerate(zip(batch.ks, batch.vs)):
        q_s = q[query_start_loc[s]:query_start_loc[s + 1]].cpu()
        expected = dense_causal_attention(q_s, k, v, scale=q.shape[-1] ** -0.5)
        torch.testing.assert_close(out[query_start_loc[s]:query_start_loc[s + 1]].cpu(), expected, **FP32_TOL)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_kernel_equals_reference_on_a_mixed_batch(group, head_dim, block_size):
    batch = make_batch(MIXED, group=group, head_dim=head_dim, block_size=block_size)
    torch.testing.assert_close(paged_attention(*batch.args), paged_attention_ref(*batch.args), **FP32_TOL)


@pytest.mark.parametrize("name", BATCHES)
def test_kernel_equals_reference_on_batch_shapes(name):
    batch = make_batch(BATCHES[name], group=4)
    torch.testing.assert_close(paged_attention(*batch.args), paged_attention_ref(*batch.args), **FP32_TOL)


@pytest.mark.parametrize("group", [1, 3])
def test_kernel_equals_reference_in_bf16(group):
    batch = make_batch(MIXED, group=group, dtype=torch.bfloat16)
    out = paged_attention(*batch.args)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, paged_attention_ref(*batch.args), **BF16_TOL)


@pytest.mark.parametrize("num_splits", [2, 4])
def test_kv_splits_combine_to_the_unsplit_result(num_splits):
    # a split may hold no key a row can see (its rows start before the split): it must add nothing
    batch = make_batch([(100, 1), (0, 1), (50, 30)], group=3)
    out = paged_attention(*batch.args, num_splits=num_splits)
    torch.testing.assert_close(out, paged_attention_ref(*batch.args), **FP32_TOL)


def test_a_long_context_decode_equals_reference():
    # on a GPU the default splits this over several programs (one sequence cannot fill the SMs)
    batch = make_batch([(3000, 1)], group=3)
    torch.testing.assert_close(paged_attention(*batch.args), paged_attention_ref(*batch.args), **FP32_TOL)


def test_kv_is_split_only_when_the_grid_is_too_small_for_the_gpu():
    assert default_num_splits(num_programs=8, max_context=32768, num_sms=132) == 64  # batch 1, 8 KV heads
    assert default_num_splits(num_programs=8, max_context=2048, num_sms=132) == 4  # splits keep >= 512 tokens
    assert default_num_splits(num_programs=2048, max_context=32768, num_sms=132) == 1  # a big batch fills the GPU
    assert default_num_splits(num_programs=8, max_context=32768, num_sms=1) == 1  # the CPU interpreter
    assert default_num_splits(num_programs=2, max_context=2**20, num_sms=132) == 128  # MAX_SPLITS: more would spill


def test_explicit_scale_is_used():
    batch = make_batch([(10, 3)], group=1)
    torch.testing.assert_close(paged_attention(*batch.args, scale=0.3),
                               paged_attention_ref(*batch.args, scale=0.3), **FP32_TOL)


def test_bad_inputs_are_named_in_the_error():
    q, k_cache, v_cache, block_tables, context_lens, query_start_loc = make_batch([(3, 2)], group=1).args
    with pytest.raises(ValueError, match="block_tables must be int32"):
        paged_attention(q, k_cache, v_cache, block_tables.long(), context_lens, query_start_loc)
    with pytest.raises(ValueError, match="num_q_heads a multiple of num_kv_heads"):
        paged_attention(q[:, :1], k_cache, v_cache, block_tables, context_lens, query_start_loc)
    with pytest.raises(ValueError, match="must share one of"):
        paged_attention(q.double(), k_cache, v_cache, block_tables, context_lens, query_start_loc)


def run_model_attention(attention: PagedAttention, seqs=MIXED) -> torch.Tensor:
    """One step of the model's attention module over `seqs`: the cached prefixes are in the
    cache (every other slot NaN), the step's new K/V are not yet: the module stores them first."""
    batch = make_batch(seqs, group=3)
    q, k_cache, v_cache, block_tables, context_lens, query_start_loc = batch.args
    new_k = torch.cat([k[-n:] for k, (_, n) in zip(batch.ks, seqs)]).to(DEVICE)
    new_v = torch.cat([v[-n:] for v, (_, n) in zip(batch.vs, seqs)]).to(DEVICE)
    block_size = k_cache.shape[1]
    pos = torch.cat([torch.arange(c, c + n) for c, n in seqs]).to(DEVICE)
    seq_of_token = torch.repeat_interleave(torch.arange(len(seqs), device=DEVICE), query_start_loc.diff())
    slot_mapping = block_tables[seq_of_token, pos // block_size].long() * block_size + pos % block_size
    caches = [c.clone().fill_(float("nan")) for c in (k_cache, v_cache)]
    for s, (k, v) in enumerate(zip(batch.ks, batch.vs)):  # the cached prefix only
        p = torch.arange(seqs[s][0], device=DEVICE)
        store_kv_ref(k[:len(p)].to(DEVICE), v[:len(p)].to(DEVICE), *caches,
                     block_tables[s, p // block_size].long() * block_size + p % block_size)
    return attention(q, new_k, new_v, *caches, AttentionMetadata(query_start_loc, context_lens, block_tables, slot_mapping))


def test_the_models_attention_with_triton_kernels_equals_its_torch_ops():
    torch.testing.assert_close(run_model_attention(TritonPagedAttention(scale=0.125)),
                               run_model_attention(PagedAttention(scale=0.125)), **FP32_TOL)
