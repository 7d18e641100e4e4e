"""Every Triton kernel specialisation the engine can launch compiles for sm_80 (A100) and sm_90
(H100, H200) with Triton's NVIDIA backend and its bundled ptxas, no GPU needed; in 16-bit dtypes
none spills registers, and every one fits the shared memory of the smallest supported GPU.

Why benchmarks/kernel_registers.py's SPECIALISATIONS cover them: the code a launch compiles is
fixed by its constexprs and dtypes. Per dtype (bf16, fp16, fp32) the set holds each tile choice
`launch_config` makes (decode; 16-bit prefill; fp32 prefill), both sides of `NUM_SPLITS == 1`
(a decode-only batch splits; prefill never does by default), the combine kernel at 2 splits and
at MAX_SPLITS, and the store kernel with padded (3 -> 4) and exact KV heads. Head dims 64 and 128
are the supported models'; groups 3 and 7 (integer division) and 4 (a shift) bound the
register counts, 7 and 3 being the heaviest of the groups 1-8 on both targets. Triton's own
value specialisations (an int argument equal to 1, divisibility by 16) change only address math.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_registers.py"
SHARED_MEMORY_BYTES = 101376  # per block on sm_86/sm_89 (RTX 4090, L40S), the least of sm_80 to sm_90


@pytest.fixture(scope="module")
def report():
    """The script's report (its rows: one per (specialisation, target), from a process of its own (in this
    suite's process, under TRITON_INTERPRET=1, Triton hands out interpreted kernels, which cannot compile)."""
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"the kernels did not compile (is ptxas bundled with triton?):\n{result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_specialisation_compiles_for_sm80_and_sm90(report):
    # (not imported here: the script switches the interpreter off for the process that imports it)
    assert report["archs"] == ["sm_80", "sm_90"]
    assert len(report["rows"]) == report["num_specialisations"] * 2 == 36
    compiled = report["rows"]
    assert {row["arch"] for row in compiled} == {"sm_80", "sm_90"}
    assert all(0 < row["registers"] <= 255 for row in compiled)


def test_no_16_bit_specialisation_spills_registers(report):
    spilled = [row for row in report["rows"] if row["dtype"] != "fp32" and row["spill_store_bytes"]]
    assert spilled == []


def test_every_specialisation_fits_the_shared_memory_of_the_smallest_gpu(report):
    assert max(row["shared_bytes"] for row in report["rows"]) <= SHARED_MEMORY_BYTES
