"""The KV pool model, the simulator and `python -m minicake.sim` on hand-built requests and on
the first 200 requests of the public conversation trace (tests/data)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minicake.cache.block_keys import block_keys
from minicake.conductor.conductor import ConductorConfig, Request
from minicake.conductor.cost_model import CostModel, paper_70b
from minicake.sim.pool_model import KVPoolModel
from minicake.sim.metrics import FINISHED, SimResult
from minicake.sim.simulator import SimConfig, Simulator
from minicake.sim.trace import TraceEntry, load_trace
from minicake.sim.__main__ import main

SLICE = Path(__file__).parent / "data" / "conversation_trace_200.jsonl"


def simulate(trace, num_prefill=2, num_decode=2, pool="global", **conductor):
    config = ConductorConfig(can_fetch=pool == "global", **conductor)
    sim = Simulator(SimConfig(num_prefill, num_decode, pool), config, paper_70b(), trace)
    return sim, sim.run()


def entry(rid, arrival_s, hash_ids, new_tokens=4):
    return TraceEntry(arrival_s, Request(rid, 512 * len(hash_ids), new_tokens, block_keys(hash_ids, 1)))


def test_lru_pool_evicts_a_prompts_tail_before_its_head():
    pool = KVPoolModel(capacity_tokens=3 * 16, block_size=16, policy="lru")
    pool.access([1, 2, 3])
    added, evicted = pool.access([4])
    assert added == [4] and evicted == [3]
    assert pool.match_len([1, 2, 3]) == 2


def test_pool_never_evicts_a_pinned_block():
    pool = KVPoolModel(capacity_tokens=2 * 16, block_size=16, policy="lru")
    pool.access([1, 2])
    pool.pin([2])
    assert pool.access([3])[1] == [1]
    assert pool.access([4])[1] == [3]  # 2 is older but pinned
    pool.unpin([2])
    assert pool.access([5])[1] == [2]


def test_lfu_keeps_a_popular_block_that_lru_would_evict():
    lru, lfu = (KVPoolModel(2 * 16, 16, policy) for policy in ("lru", "lfu"))
    for pool in (lru, lfu):
        for keys in ([1], [1], [1], [2], [3]):
            pool.access(keys)
    assert 1 not in lru and 1 in lfu


def test_every_request_of_the_slice_finishes_without_admission_control():
    trace = load_trace(SLICE)
    _, result = simulate(trace)
    s = result.summary()
    assert s["requests"] == s["finished"] == 200 and s["rejected"] == 0
    ttft = result.first_token_s - result.arrival_s
    cost = paper_70b()
    computed = [cost.prefill_time(e.request.prompt_len, int(c)) for e, c in zip(trace, result.cached_tokens)]
    assert np.all(ttft >= np.array(computed) - 1e-9)  # nobody gets a first token faster than its prefill


def test_kvcache_scheduler_reuses_more_prefix_and_computes_less_than_random():
    trace = load_trace(SLICE)
    rand = simulate(trace, scheduler="random")[1].summary()
    kv = simulate(trace, scheduler="kvcache")[1].summary()
    assert kv["hit_rate_token"] > rand["hit_rate_token"]
    assert kv["prefill_busy_s"] < rand["prefill_busy_s"]


def test_migration_copies_the_pulled_blocks_into_the_pullers_pool():
    shared = list(range(8))
    trace = [entry(0, 0.0, shared),                    # prefilled on instance 0
             entry(1, 10.0, list(range(100, 200))),    # long prompt, keeps instance 0 busy
             entry(2, 10.1, shared + [300, 301])]      # instance 1 pulls the 8 shared blocks
    sim, result = simulate(trace, num_prefill=2)
    assert sim.decisions[2].prefill_id == 1 and sim.decisions[2].fetch_from == 0
    assert result.fetched_blocks == 8
    keys = trace[2].request.block_keys
    assert sim.pools[1].match_len(keys) == 10
    assert all(sim.index.holders[k] == {0, 1} for k in keys[:8])


def test_a_fetch_can_wait_for_the_holders_prefill_in_progress():
    """Request 2's 8 shared blocks are on instance 0, which prefills request 1 until 11.024 s:
    instance 1 is chosen to fetch them (0.08 s) and prefill (0.1024 s). In minicake's cluster
    the holder sends them only after its step, so the fetch starts at 11.024 instead of 10.1."""
    cost = CostModel("fetch", (0.0, 1e-4, -1e-4, 0.0, 0.0), (0.01, 0.0, 0.0), 0.01, 512, 10**7)
    trace = [entry(0, 0.0, list(range(8))), entry(1, 10.0, list(range(100, 120))),
             entry(2, 10.1, list(range(8)) + [300, 301])]

    def run(wait):
        sim = Simulator(SimConfig(2, 1, fetch_waits_for_holder=wait), ConductorConfig(), cost, trace)
        result = sim.run()
        assert sim.decisions[2].prefill_id == 1 and sim.decisions[2].fetch_from == 0
        return result.first_token_s[2] - result.arrival_s[2]
    assert run(False) == pytest.approx(0.08 + 0.1024)
    assert run(True) == pytest.approx(11.024 + 0.08 + 0.1024 - 10.1)


def test_baseline_wastes_prefill_that_decode_refuses():
    trace = [entry(i, 0.0, list(range(100 * i, 100 * i + 40)), new_tokens=100) for i in range(4)]
    _, result = simulate(trace, num_prefill=4, num_decode=1, admission="baseline", tbt_slo_s=0.0155)
    s = result.summary()  # a step over one 20k-token context takes 15.3 ms, over two 16.0 ms > SLO
    assert s["rejected_after_prefill"] == 3 and s["wasted_prefill_s"] > 0 and s["finished"] == 1


def test_on_shared_cores_a_decode_step_and_a_prefill_that_overlap_both_slow_down():
    """Two instances computing at once on one shared core each run at half speed: request 1's
    prefill (0.1 s alone) overlaps request 0's two decode steps (0.1 s each alone)."""
    cost = CostModel("steps", (0.0, 0.01, -0.01, 0.0, 0.0), (0.1, 0.0, 0.0), 0.001, 1, 10_000)
    trace = [TraceEntry(0.0, Request(0, 10, 3, [])), TraceEntry(0.15, Request(1, 10, 3, []))]

    def run(cpu_cores):
        sim = Simulator(SimConfig(1, 1, cpu_cores=cpu_cores), ConductorConfig(block_size=1), cost, trace)
        result = sim.run()
        return list(result.first_token_s - result.arrival_s), result.step_ends[0][:2]
    # own devices, or 2 cores for 2 instances: prefill 1 runs 0.15..0.25 beside steps 0.1..0.2..0.3
    assert run(None) == run(2) == (pytest.approx([0.1, 0.1]), pytest.approx([0.2, 0.3]))
    # 1 core: step 1 has 0.05 s left at 0.15, done at half speed by 0.25; prefill 1 is half done
    # then, and ends at 0.35 beside step 2, which finishes its last 0.05 s alone at 0.40
    assert run(1) == (pytest.approx([0.1, 0.2]), pytest.approx([0.25, 0.40]))
    with pytest.raises(ValueError, match="cpu_cores"):
        SimConfig(cpu_cores=0)


def test_a_decode_step_spread_raises_tbt_above_the_mean_gap():
    """TBT takes a request's slowest 10% of gaps: steps of 0.1 s that vary (cv 20%) keep the
    mean gap near 0.1 s but make the slowest gaps longer; without spread both are 0.1 s."""
    trace = [TraceEntry(0.0, Request(0, 10, 41, []))]

    def run(cv):
        cost = CostModel("spread", (0.0, 0.01, -0.01, 0.0, 0.0), (0.1, 0.0, 0.0), 0.001, 1, 10_000, cv)
        s = Simulator(SimConfig(1, 1), ConductorConfig(block_size=1), cost, trace).run().summary()
        return s["avg_tbt_s"], s["avg_tpot_s"]
    assert run(0.0) == pytest.approx((0.1, 0.1))
    tbt, tpot = run(0.2)
    assert tpot == pytest.approx(0.1, rel=0.1) and tbt > 1.2 * tpot
    assert run(0.2) == (tbt, tpot), "the spread is drawn from a fixed seed"


def test_tbt_is_the_mean_of_the_slowest_tenth_of_gaps():
    trace = [entry(0, 0.0, [1], new_tokens=21)]
    result = SimResult.empty(trace, 1, ConductorConfig())
    result.first_token_s[0] = 1.0
    result.step_ends[0] = list(1.0 + np.cumsum([0.01] * 18 + [0.5, 0.3]))  # 20 gaps, two slow ones
    result.finish(0, decode_id=0, join_step=0)
    tbt, tpot = result.tbt()
    assert tbt[0] == pytest.approx(0.4) and tpot[0] == pytest.approx((18 * 0.01 + 0.8) / 20)
    assert result.status[0] == FINISHED


def test_cli_ends_with_one_json_line(capsys, tmp_path):
    plot = tmp_path / "load.png"
    assert main(["--trace", str(SLICE), "--limit", "50", "--prefill", "2", "--decode", "2",
                 "--admission", "predictive", "--plot", str(plot)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("requests", "finished", "rejected", "avg_ttft_s", "p50_ttft_s", "p90_ttft_s", "p99_ttft_s",
                "avg_tbt_s", "p90_tbt_s", "effective_fraction", "hit_rate_block", "hit_rate_token", "prefill_busy_s"):
        assert key in last
    assert last["requests"] == 50 and plot.stat().st_size > 0


def test_a_shipped_trace_is_named_by_its_name_and_read_from_its_gzip():
    """tests/data's slice is the first 200 lines of the shipped conversation trace."""
    shipped, slice_ = load_trace("conversation", limit=200), load_trace(SLICE)
    assert [(e.arrival_s, e.request) for e in shipped] == [(e.arrival_s, e.request) for e in slice_]
    assert len(load_trace("synthetic")) == 3993


def test_cli_replays_a_shipped_trace_by_name(capsys):
    assert main(["--trace", "synthetic", "--limit", "20", "--prefill", "2", "--decode", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["requests"] == 20


def test_cli_names_a_missing_trace_and_exits_2(capsys, tmp_path):
    assert main(["--trace", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_cli_names_the_malformed_line_and_exits_2(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = SLICE.read_text().splitlines()[:3]
    bad.write_text("\n".join(lines[:2] + ['{"timestamp": 5, "input_length": 700}']) + "\n")
    assert main(["--trace", str(bad)]) == 2
    assert "bad.jsonl:3" in capsys.readouterr().err


def trace_whose_third_timestamp_is(tmp_path, timestamp: str) -> Path:
    """Three requests at 0 ms, 10 ms and `timestamp`, written as raw JSON text."""
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(f'{{"timestamp": {ts}, "input_length": 100, "output_length": 4, "hash_ids": [{i}]}}\n'
                            for i, ts in enumerate(["0", "10", timestamp])))
    return path


@pytest.mark.parametrize("timestamp", ["NaN", "Infinity", "-Infinity", "1e400", "-5", "5"])
def test_a_non_finite_negative_or_backwards_timestamp_is_refused_by_file_and_line(tmp_path, timestamp):
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: "):
        load_trace(trace_whose_third_timestamp_is(tmp_path, timestamp))


def test_cli_refuses_a_nan_timestamp_in_one_line_with_exit_code_2(tmp_path):
    """Python's json reads NaN; before, the simulator looped forever on it."""
    trace = trace_whose_third_timestamp_is(tmp_path, "NaN")
    done = subprocess.run([sys.executable, "-m", "minicake.sim", "--trace", str(trace)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"error: {trace}:3: not a trace line (NaN is not a finite number)"]


def test_the_simulator_refuses_arrivals_it_could_never_reach():
    for arrivals in ([0.0, float("nan")], [0.0, float("inf")], [1.0, 0.5], []):
        with pytest.raises(ValueError, match="arrivals finite, >= 0 and in order"):
            simulate([entry(i, t, [i]) for i, t in enumerate(arrivals)])


def test_cli_json_line_has_null_where_no_request_finished(capsys, tmp_path):
    """A mean over no requests is NaN in Python, which JSON cannot say: it prints null."""
    trace = tmp_path / "huge.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 100, "output_length": 1000000000, "hash_ids": [0]}\n')
    assert main(["--trace", str(trace), "--prefill", "1", "--decode", "1"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1], parse_constant=pytest.fail)
    assert last["finished"] == 0 and last["avg_ttft_s"] is None and last["p99_ttft_s"] is None


def test_cli_names_a_bad_slo_and_exits_2(capsys):
    assert main(["--trace", str(SLICE), "--ttft-slo", "0"]) == 2
    assert "SLO" in capsys.readouterr().err


def test_cli_names_an_unknown_flag_value_and_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--trace", str(SLICE), "--scheduler", "fastest"])
    assert e.value.code == 2 and "--scheduler" in capsys.readouterr().err
