"""CausalLM computes what transformers computes, for Llama, Qwen2 and Qwen3 checkpoints: as
written (plain torch) and with the CPU platform applied (C kernels, CPU attention).

Each test loads a tiny random checkpoint saved by transformers both ways and drives
minicake's model over the paged flat batch (tests/model_fixtures.py) with block size 4.
"""
import pytest
import torch
from model_fixtures import PagedCache, greedy, hf_greedy
from transformers import AutoModelForCausalLM

from minicake.llm import LLM
from minicake.model.loader import load_model
from minicake.platforms import apply_platform
from minicake.platforms.cpu import kernels as cpu_kernels
from minicake.sampling import SamplingParams

ARCHS = ["llama", "qwen2", "qwen3"]
# lengths 5, 8 (ends exactly on a block boundary) and 13
PROMPTS = [[11, 42, 7, 300, 99], [5, 6, 7, 8, 9, 10, 11, 12], [200 + i for i in range(13)]]


@pytest.fixture(scope="module", params=[(arch, kernels) for arch in ARCHS for kernels in ("torch", "auto")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def models(request, tiny_checkpoint):
    arch, kernels = request.param
    path = tiny_checkpoint(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    model = load_model(path, device="cpu")
    apply_platform(model, torch.device("cpu"), kernels)
    return model, hf


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]  # [len, vocab]


def test_batched_prefill_logits_equal_transformers(models):
    model, hf = models
    _, _, prompt_logits = greedy(model, PROMPTS, num_tokens=1)
    for prompt, logits in zip(PROMPTS, prompt_logits):
        torch.testing.assert_close(logits, hf_logits(hf, prompt), atol=1e-4, rtol=0)


@pytest.mark.parametrize("batch", [PROMPTS[:1], PROMPTS], ids=["single", "batched"])
def test_greedy_32_tokens_and_decode_logits_equal_transformers(models, batch):
    model, hf = models
    tokens, step_logits, _ = greedy(model, batch, num_tokens=32)
    for prompt, out, logits in zip(batch, tokens, step_logits):
        assert out == hf_greedy(hf, prompt, 32)
        # the logits of every decode step equal transformers' at the same positions
        expected = hf_logits(hf, prompt + out[:-1])[len(prompt) - 1:]
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_prefill_in_chunks_equals_prefill_in_one_step(models):
    """A prompt prefilled in two steps (the second attending to the cached first) gives the
    same logits: what chunked prefill and prefix caching rely on."""
    model, _ = models
    prompt = PROMPTS[2]
    cache = PagedCache(model.config, num_seqs=1, max_len=len(prompt), block_size=4)
    first = cache.forward(model, [(0, 0, prompt[:8])])[0]
    second = cache.forward(model, [(0, 8, prompt[8:])])[0]
    _, _, (whole,) = greedy(model, [prompt], num_tokens=1)
    torch.testing.assert_close(torch.cat([first, second]), whole, atol=1e-5, rtol=0)


def test_mixed_prefill_and_decode_in_one_batch(models):
    """A decode token of one sequence and a prefill of another share a step."""
    model, hf = models
    a, b = PROMPTS[0], PROMPTS[1]
    cache = PagedCache(model.config, num_seqs=2, max_len=16, block_size=4)
    cache.forward(model, [(0, 0, a)])
    decode_a, prefill_b = cache.forward(model, [(0, len(a), [17]), (1, 0, b)])
    torch.testing.assert_close(decode_a[0], hf_logits(hf, a + [17])[-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(prefill_b, hf_logits(hf, b), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_torch_runs_only_the_models_own_lines_and_equals_transformers(arch, tiny_checkpoint, monkeypatch):
    """An engine with kernels="torch" applies no platform: no C kernel is built or called, no
    module is a platform twin, and greedy tokens still equal transformers'."""
    def forbidden(*args):
        raise AssertionError("the CPU platform's kernels were used")
    monkeypatch.setattr(cpu_kernels, "library", forbidden)
    path = tiny_checkpoint(arch)
    llm = LLM(str(path), device="cpu", kernels="torch", block_size=4, num_kv_blocks=64, num_threads=1)
    assert llm.engine.platform == "torch"
    assert not [m for m in llm.engine.model.modules() if type(m).__module__.startswith("minicake.platforms")]
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    assert [o.token_ids for o in outputs] == [hf_greedy(hf, prompt, 16) for prompt in PROMPTS]
