"""What the engine benchmarks share: the machine's bounds and the transformers peer.

Each benchmark measures, in the same run as the engine: the fp32 matmul rate of this CPU
(a large square matmul, best of a few), its memory read bandwidth (a sum over a tensor far
larger than the caches), and Hugging Face transformers on the same requests. The machine is
shared, so its load average is reported with every figure.
"""
import os
import time

import torch

from minicake.platforms.cpu.kernels import huge_page_empty


def load_average() -> float:
    return os.getloadavg()[0]


def matmul_gflops(n: int = 2048, reps: int = 8) -> float:
    """Best fp32 rate of an n x n x n matmul: the roofline every token's matmuls run against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def read_gbps(num_bytes: int = 1 << 30, reps: int = 5) -> float:
    """Best rate of reading num_bytes once (a sum): the bound of a batch-1 decode step. The
    tensor lies in 2 MiB pages, as the engine's packed weights do: in 4 KiB pages the same sum
    read 10-30% slower here (address translation), understating the bound."""
    x = huge_page_empty(num_bytes // 4).fill_(1.0)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best / 1e9


def num_parameters(model) -> int:
    """The checkpoint's parameters: a head tied to the embedding counts once, although the CPU
    platform gives it a packed copy of its own (platforms/cpu/modules.py, pack_weights)."""
    n = sum(p.numel() for p in model.parameters())
    if model.config.tie_word_embeddings and model.lm_head is not None:
        n -= model.lm_head.weight.numel()
    return n


def load_hf(model_dir, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """transformers' model for the same checkpoint, eval mode, never stopping at EOS."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None  # like ignore_eos: every request gets its length
    hf.generation_config.pad_token_id = 0
    return hf


@torch.inference_mode()
def hf_generate(hf, prompts: list[list[int]], max_new_tokens: int) -> torch.Tensor:
    """One batched, left-padded `generate` call, greedy: how a user batches with transformers."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=hf.device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    out = hf.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                      do_sample=False)
    return out[:, width:].cpu()  # on the host, as minicake's tokens are (and the GPU's work is done)
