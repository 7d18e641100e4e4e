"""The CPU platform (minicake/platforms/cpu) equals the plain torch it replaces: the C decode
attention and the CPU-shaped torch attention equal the reference and read only the slots a
sequence owns (every other slot holds NaN); the packed matmul equals F.linear for every
leftover of its 12-row tiles and 32-column panels; the fused RMSNorm, the in-place RoPE, the KV
store and silu_and_mul equal their formulas or the reference. Where no C compiler is found, one
warning and torch does the work.
"""
import pytest
import torch

from minicake.kernels.reference import paged_attention_ref
from minicake.model.loader import load_model
from minicake.platforms import apply_platform
from minicake.platforms.cpu import attention as cpu_attention
from minicake.platforms.cpu import kernels as cpu_kernels
from minicake.platforms.cpu.modules import CpuPagedAttention, PackedLinear
from test_kernel_paged_attention import FP32_TOL, LONG_CHUNKS, MIXED, PagedAttention, make_batch, run_model_attention

needs_kernel = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler here")


def decode_args(batch):
    q, k_cache, v_cache, block_tables, context_lens, _ = batch.args
    return q, k_cache, v_cache, block_tables, context_lens, q.shape[-1] ** -0.5


@needs_kernel
@pytest.mark.parametrize("group,num_kv_heads,head_dim", [(1, 2, 64), (3, 3, 64), (4, 2, 128), (2, 1, 32)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_kernel_equals_reference(group, num_kv_heads, head_dim, block_size):
    # lengths: one token, a block exactly, one past a block, long
    seqs = [(0, 1), (block_size - 1, 1), (block_size, 1), (200, 1), (37, 1)]
    batch = make_batch(seqs, group=group, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size)
    out = cpu_kernels.decode_attention(*decode_args(batch))
    assert not out.isnan().any(), "read a slot outside the sequence's blocks"
    torch.testing.assert_close(out, paged_attention_ref(*batch.args), **FP32_TOL)


@needs_kernel
def test_kernel_reads_q_as_a_view_of_the_fused_qkv_output():
    batch = make_batch([(37, 1), (0, 1), (15, 1)], group=3, num_kv_heads=3, head_dim=64)
    q, *rest = decode_args(batch)
    fused = torch.randn(q.shape[0], q.shape[1] + 6, q.shape[2])  # per token: the q heads, then 3 k and 3 v
    fused[:, :q.shape[1]] = q
    out = cpu_kernels.decode_attention(fused[:, :q.shape[1]], *rest)
    torch.testing.assert_close(out, paged_attention_ref(*batch.args), **FP32_TOL)


@pytest.mark.parametrize("with_c", [False, pytest.param(True, marks=needs_kernel)], ids=["torch", "c_decodes"])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("seqs", [MIXED, LONG_CHUNKS, [(40, 1), (15, 1), (63, 1)] * 4],
                         ids=["mixed", "long_chunks", "decode_groups"])
def test_the_cpu_attention_equals_the_reference(seqs, group, with_c):
    # long_chunks: prefills spanning several causal query tiles; decode_groups: more than one group of 8
    batch = make_batch(seqs, group=group)
    out = cpu_attention.paged_attention(*batch.args, scale=batch.args[0].shape[-1] ** -0.5,
                                        decode_attention=cpu_kernels.decode_attention if with_c else None)
    torch.testing.assert_close(out, paged_attention_ref(*batch.args), **FP32_TOL)


def test_the_cpu_twin_of_the_models_attention_equals_its_torch_ops():
    torch.testing.assert_close(run_model_attention(CpuPagedAttention(scale=0.125)),
                               run_model_attention(PagedAttention(scale=0.125)), **FP32_TOL)


def test_no_compiler_warns_once_and_torch_does_the_work(monkeypatch, tmp_path, caplog, tiny_checkpoint):
    monkeypatch.setenv("MINICAKE_CACHE", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu_kernels, "_library", None)
    assert cpu_kernels.library() is None
    assert "no-such-compiler" in caplog.text and "torch does its work instead" in caplog.text
    caplog.clear()
    assert cpu_kernels.library() is None and not caplog.text, "one warning, not one per call"
    model = load_model(tiny_checkpoint("llama"), device="cpu")
    apply_platform(model, torch.device("cpu"), "auto")
    assert model.layers[0].mlp.gate_up_proj.weight.dim() == 2, "left unpacked: torch's matmul reads it"


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 12, 13, 27, 300])  # whole tiles of 12 rows and every leftover size
@pytest.mark.parametrize("in_features,out_features", [(96, 200), (64, 7), (40, 32)])  # 200, 7: a partial panel
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_torch(rows, in_features, out_features, bias):
    gen = torch.Generator().manual_seed(rows)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(rows, in_features, generator=gen)
    with torch.inference_mode():
        expected = layer(x)
        layer.weight = torch.nn.Parameter(cpu_kernels.pack_weight(layer.weight), requires_grad=False)
        layer.__class__ = PackedLinear
        assert layer.weight.shape == (-(-out_features // 32), in_features, 32)
        torch.testing.assert_close(layer(x), expected, **FP32_TOL)


def test_the_avx2_tiles_equal_torch(monkeypatch, tmp_path):
    """Without AVX-512 the tile is 6 rows by half a panel: built here with -mno-avx512f."""
    monkeypatch.setenv("MINICAKE_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "FLAGS", cpu_kernels.FLAGS + ["-mno-avx512f"])
    monkeypatch.setattr(cpu_kernels, "_library", None)
    if cpu_kernels.library() is None:
        pytest.skip("no C compiler here, or not an x86 one")
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 5, 6, 7, 13):  # whole tiles of 6 rows and the leftovers
        for out_features in (200, 20, 7):  # the last panel ends in its first half (200: 8 columns, 7) or second (20)
            w, x = torch.randn(out_features, 48, generator=gen), torch.randn(rows, 48, generator=gen)
            b = torch.randn(out_features, generator=gen)
            out = cpu_kernels.packed_linear(x, cpu_kernels.pack_weight(w), out_features, b)
            torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), **FP32_TOL)


@needs_kernel
def test_the_cpu_platform_packs_every_linear_weight_and_the_tied_head(tiny_checkpoint):
    model = load_model(tiny_checkpoint("llama"), device="cpu")  # tied embedding
    apply_platform(model, torch.device("cpu"), "auto")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(type(m) is PackedLinear and m.weight.dim() == 3 for m in linears) and model.lm_head in linears
    hidden = torch.randn(5, model.config.hidden_size)
    expected = torch.nn.functional.linear(hidden, model.embed_tokens.weight)
    torch.testing.assert_close(model.compute_logits(hidden), expected, **FP32_TOL)


def test_huge_page_empty_is_aligned_to_a_huge_page():
    buffer = cpu_kernels.huge_page_empty(1000)
    assert buffer.shape == (1000,) and buffer.dtype == torch.float32
    assert buffer.data_ptr() % cpu_kernels.HUGE_PAGE == 0
    buffer.fill_(2)  # writable
    assert buffer.sum().item() == 2000


@needs_kernel
@pytest.mark.parametrize("rows", [1, 40])  # 40: split between the threads
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_equals_the_formula(rows, with_residual):
    x, residual, weight = torch.randn(rows, 96), torch.randn(rows, 96), torch.rand(96) + 0.5
    h = x + residual if with_residual else x
    expected = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
    out = cpu_kernels.rms_norm(x, weight, 1e-6, residual if with_residual else None)
    if with_residual:
        out, new_residual = out
        torch.testing.assert_close(new_residual, h, **FP32_TOL)
    torch.testing.assert_close(out, expected, **FP32_TOL)


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 33])  # 33 x 3 heads: split between the threads
def test_rms_norm_of_each_head_of_a_strided_view(tokens):
    """Qwen3 normalizes each head of q and k: views of the fused q/k/v output."""
    fused, weight = torch.randn(tokens, 7, 32), torch.rand(32) + 0.5  # 3 heads of q, 2 of k, 2 of v
    q = fused.split_with_sizes([3, 2, 2], dim=1)[0]  # [tokens, 3, 32], token rows 224 floats apart
    expected = weight * (q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(cpu_kernels.rms_norm(q, weight, 1e-6), expected, **FP32_TOL)


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 33])
def test_rope_rotates_strided_q_and_k_in_place_like_rotate_half(tokens):
    from minicake.model.rope import RotaryEmbedding
    rotary = RotaryEmbedding(head_dim=32, theta=10000.0, max_positions=128, scaling=None)
    cos, sin = rotary._table(torch.device("cpu"))
    positions = torch.randint(0, 128, (tokens,))
    fused = torch.randn(tokens, 7 * 32)  # like a q/k/v output: 3 heads of q, 2 of k, 2 of v
    q, k, v = fused.view(tokens, 7, 32).split_with_sizes([3, 2, 2], dim=1)  # token rows 224 floats apart

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos[positions, None] + torch.cat((-x2, x1), dim=-1) * sin[positions, None]

    expected_q, expected_k, untouched = rotate_half(q), rotate_half(k), v.clone()
    cpu_kernels.rope_(q, k, positions, cos, sin)
    torch.testing.assert_close(q, expected_q, **FP32_TOL)
    torch.testing.assert_close(k, expected_k, **FP32_TOL)
    assert torch.equal(v, untouched), "wrote outside q and k"


@needs_kernel
def test_store_kv_writes_strided_k_v_like_the_reference_and_skips_minus_one():
    from minicake.kernels.reference import store_kv_ref
    fused = torch.randn(9, 7, 32)  # 9 tokens of q/k/v output: 3 heads of q, 2 of k, 2 of v
    _, k, v = fused.split_with_sizes([3, 2, 2], dim=1)
    slots = torch.randperm(4 * 8)[:9]
    slots[[2, 7]] = -1  # tokens whose block came from the prefix cache
    caches = [torch.randn(4, 8, 2, 32) for _ in range(2)]
    expected = [c.clone() for c in caches]
    store_kv_ref(k, v, *expected, slots)
    cpu_kernels.store_kv(k, v, *caches, slots)
    assert all(torch.equal(c, e) for c, e in zip(caches, expected))
    slots[4] = 4 * 8  # one past the last slot
    with pytest.raises(IndexError, match=r"slot_mapping\[4\] = 32 is past the cache's 32 slots"):
        cpu_kernels.store_kv(k, v, *caches, slots)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 40])
def test_silu_and_mul_equals_torch(rows):
    x = torch.randn(rows, 2 * 48) * 4
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(cpu_kernels.silu_and_mul(x), torch.nn.functional.silu(gate) * up, **FP32_TOL)
