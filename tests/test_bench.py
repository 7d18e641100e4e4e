"""`python -m minicake.bench`: how a Mooncake trace becomes token prompts, how arrivals and
goodput are computed, and a short run against a real server."""
import json
import subprocess
import sys

import numpy as np
import pytest

from minicake import bench
from minicake.bench import BenchResult, paper_tbt, poisson_arrivals, summarize, trace_requests

TRACE = [  # two requests share hash ids 0 and 1 (a common prefix), the third shares nothing
    {"timestamp": 0, "input_length": 1100, "output_length": 64, "hash_ids": [0, 1, 2]},
    {"timestamp": 500, "input_length": 1500, "output_length": 32, "hash_ids": [0, 1, 3]},
    {"timestamp": 1500, "input_length": 300, "output_length": 8, "hash_ids": [4]},
]


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TRACE))
    return path


def test_shared_hash_ids_become_shared_token_prefixes_and_lengths_scale(trace_file):
    a, b, c = trace_requests(str(trace_file), 3, scale=1 / 8, vocab_size=512, seed=0)
    block = 512 // 8  # tokens per hash id
    assert a.prompt[:2 * block] == b.prompt[:2 * block]  # hash ids 0, 1
    assert a.prompt[2 * block:3 * block] != b.prompt[2 * block:3 * block]  # 2 vs 3
    assert c.prompt[:block] != a.prompt[:block]
    assert [len(r.prompt) for r in (a, b, c)] == [round(1100 / 8), round(1500 / 8), round(300 / 8)]
    assert [r.output_len for r in (a, b, c)] == [64 // 8, 32 // 8, 1]
    assert [r.arrival_s for r in (a, b, c)] == [0.0, 0.5, 1.5]
    assert all(0 <= t < 512 for r in (a, b, c) for t in r.prompt)


def test_the_same_seed_gives_the_same_prompts(trace_file):
    first = trace_requests(str(trace_file), 3, 1 / 64, 512, seed=1)
    assert [r.prompt for r in first] == [r.prompt for r in trace_requests(str(trace_file), 3, 1 / 64, 512, seed=1)]
    assert [r.prompt for r in first] != [r.prompt for r in trace_requests(str(trace_file), 3, 1 / 64, 512, seed=2)]


@pytest.mark.parametrize("timestamp", ["NaN", "Infinity", "-1", "100"])
def test_a_non_finite_negative_or_backwards_timestamp_is_refused_by_file_and_line(tmp_path, timestamp):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in TRACE[:2]] + [json.dumps(TRACE[2]).replace("1500", timestamp)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: "):
        trace_requests(str(path), 3, scale=1 / 8, vocab_size=512, seed=0)


def test_cli_refuses_an_infinite_timestamp_in_one_line_with_exit_code_2(tmp_path):
    """The trace is read before any request is sent: no server is needed to refuse it."""
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(TRACE[0]).replace(": 0,", ": Infinity,") + "\n")
    done = subprocess.run([sys.executable, "-m", "minicake.bench", "--trace", str(path),
                           "--base-url", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"error: {path}:1: not a trace line (Infinity is not a finite number)"]


def test_poisson_arrivals_start_at_zero_and_average_the_rate():
    requests = bench.random_requests(4000, 4, 4, 512, seed=0)
    poisson_arrivals(requests, rate=20.0, seed=0)
    times = np.array([r.arrival_s for r in requests])
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0)
    assert abs(np.diff(times).mean() - 1 / 20) < 0.05 / 20


def test_tbt_is_the_mean_of_the_slowest_tenth_of_the_gaps():
    assert paper_tbt([0.01] * 18 + [0.5, 0.3]) == pytest.approx(0.4)
    assert paper_tbt([0.02, 0.04]) == pytest.approx(0.04)  # at least one gap
    assert paper_tbt([]) == 0.0


def test_goodput_counts_requests_within_both_slos():
    fast = BenchResult(True, 10, ttft=0.1, itls=[0.01] * 9, e2e=0.19, output_tokens=10)
    slow_first = BenchResult(True, 10, ttft=2.0, itls=[0.01] * 9, e2e=2.09, output_tokens=10)
    slow_gaps = BenchResult(True, 10, ttft=0.1, itls=[0.01] * 8 + [0.9], e2e=1.0, output_tokens=10)
    failed = BenchResult(False, 10, error="HTTP 500")
    s = summarize([fast, slow_first, slow_gaps, failed], duration=4.0, ttft_slo=1.0, tbt_slo=0.5)
    assert (s["completed"], s["failed"], s["effective_requests"]) == (3, 1, 1)
    assert s["goodput"] == pytest.approx(0.25) and s["effective_share"] == pytest.approx(0.25)
    assert s["tpot_ms"]["median"] == pytest.approx(10.0)
    assert s["output_tokens"] == 30


def test_bench_against_a_real_server_completes_every_request(tiny_server, capsys):
    summary = bench.main(["--base-url", tiny_server.url, "--num-requests", "6", "--input-len", "20",
                          "--output-len", "5", "--rate", "50", "--vocab-size", "512",
                          "--ttft-slo", "60", "--tbt-slo", "60"])
    last_line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last_line["completed"] == summary["completed"] == 6
    assert summary["output_tokens"] == 6 * 5 and summary["input_tokens"] == 6 * 20
    assert summary["effective_requests"] == 6
    assert summary["ttft_ms"]["p99"] >= summary["ttft_ms"]["median"] > 0
