"""benchmarks/kernel_bench.py compares the kernel with SDPA on the same data, and runs on CPU-only machines."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minicake.kernels.paged_attention import paged_attention
from minicake.kernels.reference import paged_attention_ref

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_bench.py"
spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("context_len, q_len", [(40, 1), (24, 24)], ids=["decode", "prefill"])
def test_benchmark_feeds_kernel_and_sdpa_the_same_attention(context_len, q_len):
    case = bench.make_case(batch=2, context_len=context_len, q_len=q_len, dtype=torch.float32, device=DEVICE,
                           num_q_heads=4, num_kv_heads=2, head_dim=64)
    expected = bench.run_sdpa(case)
    torch.testing.assert_close(paged_attention_ref(*case.paged), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(paged_attention(*case.paged), expected, atol=1e-4, rtol=1e-4)


def test_peak_bandwidth_is_looked_up_by_device_name():
    assert bench.peak_gbps_for("NVIDIA H200") == 4800
    assert bench.peak_gbps_for("NVIDIA H100 80GB HBM3") == 3350
    assert bench.peak_gbps_for("NVIDIA L40S") == 864  # not taken for an L4
    assert bench.peak_gbps_for("NVIDIA GH200 480GB") == 4000  # not taken for an H200
    assert bench.peak_gbps_for("Some Future GPU") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the benchmark runs for real on a GPU")
def test_benchmark_without_cuda_says_so_and_exits_0():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "needs a CUDA GPU" in result.stdout
