"""Faults: a dead, hung or silent instance aborts its requests with a reason, never a hang or a leak.

Every test kills something on purpose, so each starts its own small cluster (or server) of the
tiny Llama checkpoint. The checks: outputs finish with "abort" and an error within the transfer
(or heartbeat) timeout, the surviving instance's blocks are all free again, the cluster serves
on while it can and says why not once it cannot, `close()` returns, and no instance process
outlives its parent, not even a parent killed with SIGKILL. The server ends every stream with
a final event and `[DONE]`, exits 1 once it cannot serve, and 0 after a SIGTERM.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx
import psutil
import pytest
from server_process import ServerProcess

from minicake.sampling import SamplingParams
from minicake.disagg.cluster import Cluster, ClusterUnavailable
from minicake.disagg.messages import error_line
from test_disagg import prompts, settled_stats, tiny_config

TIMEOUT_S = 3.0  # kv_transfer_timeout of these clusters
HEARTBEAT_S = 3.0  # heartbeat_timeout of the clusters that test it


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_finished(cluster: Cluster, request_ids: set[str], limit: float) -> dict:
    finished, deadline = {}, time.monotonic() + limit
    while set(finished) != request_ids:
        assert time.monotonic() < deadline, f"only {sorted(finished)} finished within {limit}s"
        for out in cluster.get_outputs(timeout=0.2):
            if out.finished:
                finished[out.request_id] = out
    return finished


def wait_until(condition, limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {limit}s"
        time.sleep(0.05)


def start_generating(cluster: Cluster, num_requests: int = 3) -> set[str]:
    """Greedy requests of 200 tokens, returned once the first tokens came back (generation has begun)."""
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    for i, p in enumerate(prompts()[:num_requests]):
        cluster.add_request(f"r{i}", p, params)
    assert cluster.get_outputs(timeout=30), "no token within 30s"
    return {f"r{i}" for i in range(num_requests)}


def start(tiny_checkpoint, timeout: float = TIMEOUT_S, **cluster_args) -> Cluster:
    return Cluster(tiny_config(tiny_checkpoint("llama"), kv_transfer_timeout=timeout), **cluster_args)


def rank_pid(cluster: Cluster, role: str, stage: int = 0) -> int:
    return next(p.pid for s, p in zip(cluster.specs, cluster.procs) if s.role == role and s.stage == stage)


def decode_stats(cluster: Cluster) -> dict:
    return next(s for s in cluster.stats() if s["role"] == "decode")


def test_killing_the_decode_instance_mid_generation_aborts_its_requests(tiny_checkpoint):
    with start(tiny_checkpoint) as cluster:
        request_ids = start_generating(cluster)
        os.kill(rank_pid(cluster, "decode"), signal.SIGKILL)
        start_time = time.monotonic()
        finished = wait_finished(cluster, request_ids, limit=TIMEOUT_S + 5)
        assert time.monotonic() - start_time < TIMEOUT_S + 5
        assert {o.finish_reason for o in finished.values()} == {"abort"}
        assert all("decode instance (rank 1) died" in o.error for o in finished.values())
        assert not cluster.is_healthy()
        prefill = next(s for s in settled_stats(cluster) if s["role"] == "prefill")
        assert prefill["num_blocks"] > 0, "the prefill instance reported its stats"
        assert prefill["num_free_blocks"] == prefill["num_blocks"] and prefill["alive"]
        closing = time.monotonic()
    assert time.monotonic() - closing < 15, "close() returns in bounded time"
    assert not any(pid_alive(p.pid) for p in cluster.procs)


def test_killing_a_prefill_stage_mid_transfer_aborts_the_request_and_frees_the_reserved_blocks(tiny_checkpoint):
    # Two stages of one layer each. Stage 1 is frozen, so the decode instance receives all of
    # layer 0's K/V (from stage 0) and none of layer 1's; then stage 1 is killed. The long
    # transfer timeout shows that the death itself, not a timeout, ends the request.
    with start(tiny_checkpoint, timeout=60.0, pipeline_stages=2) as cluster:
        stage1_pid = rank_pid(cluster, "prefill", stage=1)
        os.kill(stage1_pid, signal.SIGSTOP)
        prompt = prompts()[3][:32]  # one chunk: stage 0 runs it once and never waits on stage 1
        cluster.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=5))
        layer0_blocks = len(prompt) // cluster.config.block_size
        wait_until(lambda: decode_stats(cluster).get("num_received_blocks", 0) >= layer0_blocks, 30,
                   "layer 0's K/V reaches the decode instance")
        assert decode_stats(cluster)["num_receiving"] == 1, "layer 1 is still missing"
        os.kill(stage1_pid, signal.SIGKILL)
        killed = time.monotonic()
        out = wait_finished(cluster, {"r"}, limit=10)["r"]
        assert time.monotonic() - killed < 10
        # the parent sees the death, or the decode side sees the K/V stream break: either names rank 1
        assert out.finish_reason == "abort" and "rank 1" in out.error, out.error
        wait_until(lambda: not cluster.is_healthy(), 10, "the parent notices the death")
        stats = settled_stats(cluster)
        assert [s["alive"] for s in stats] == [True, False, True], "stage 0 and the decode instance survive"
        decode = stats[2]
        assert decode["num_received_blocks"] == layer0_blocks, "nothing of layer 1 arrived"
        assert decode["num_free_blocks"] == decode["num_blocks"] and decode["kv_usage"] == 0.0, "no block leaked"
        assert decode["num_running"] == decode["num_receiving"] == 0
        with pytest.raises(ClusterUnavailable, match="rank 1"):  # its only prefill group is broken
            cluster.add_request("after", prompts()[0], SamplingParams(max_tokens=5))
        closing = time.monotonic()
    assert time.monotonic() - closing < 15, "close() returns in bounded time"
    assert not any(pid_alive(p.pid) for p in cluster.procs)


def test_a_frozen_next_stage_aborts_a_multi_chunk_prompt_and_stage_0_survives(tiny_checkpoint):
    # 90 tokens in chunks of 32: stage 0 sends chunk 0's hidden states to the frozen stage 1,
    # then waits on that send before chunk 1's and times out. Only the request fails.
    with start(tiny_checkpoint, pipeline_stages=2) as cluster:
        stage1_pid = rank_pid(cluster, "prefill", stage=1)
        os.kill(stage1_pid, signal.SIGSTOP)
        cluster.add_request("r", prompts()[3], SamplingParams(temperature=0, max_tokens=5))
        out = wait_finished(cluster, {"r"}, limit=TIMEOUT_S + 10)["r"]
        # stage 0's hidden-state send or the decode side's silence clock, whichever ends first
        assert out.finish_reason == "abort" and f"{TIMEOUT_S:g}s" in out.error, out.error
        assert "rank 1" in out.error or "ranks [0, 1]" in out.error, out.error
        wait_until(lambda: cluster.stats()[0]["num_free_blocks"] == cluster.stats()[0]["num_blocks"] > 0, 10,
                   "stage 0 frees the request's blocks")
        stage0, decode = cluster.stats()[0], decode_stats(cluster)
        assert stage0["alive"] and cluster.is_healthy(), "stage 0 survives: no instance crashed"
        wait_until(lambda: decode_stats(cluster)["num_free_blocks"] == decode["num_blocks"], 5, "no block leaked")
        os.kill(stage1_pid, signal.SIGKILL)  # a thawed stage 1 would be out of step with stage 0
        closing = time.monotonic()
    assert time.monotonic() - closing < 15, "close() returns in bounded time"


def test_a_silent_prefill_instance_times_out_the_transfer(tiny_checkpoint):
    with start(tiny_checkpoint) as cluster:
        prefill_pid = rank_pid(cluster, "prefill")
        os.kill(prefill_pid, signal.SIGSTOP)  # alive but silent: only the timeout can tell
        cluster.add_request("r", prompts()[3], SamplingParams(temperature=0, max_tokens=5))
        start_time = time.monotonic()
        out = wait_finished(cluster, {"r"}, limit=TIMEOUT_S + 5)["r"]
        assert TIMEOUT_S <= time.monotonic() - start_time < TIMEOUT_S + 5
        assert out.finish_reason == "abort" and "no KV from ranks [0]" in out.error
        decode = next(s for s in settled_stats(cluster) if s["role"] == "decode")
        assert decode["num_free_blocks"] == decode["num_blocks"]
        os.kill(prefill_pid, signal.SIGCONT)


def test_a_hung_decode_instance_is_declared_dead_within_the_heartbeat_timeout_and_killed(tiny_checkpoint):
    # The transfer timeout is long: only the heartbeat can tell that the decode instance hangs.
    with start(tiny_checkpoint, timeout=60.0, heartbeat_timeout=HEARTBEAT_S) as cluster:
        decode_pid = rank_pid(cluster, "decode")
        os.kill(decode_pid, signal.SIGSTOP)
        stopped = time.monotonic()
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        for i, p in enumerate(prompts()[:2]):
            cluster.add_request(f"r{i}", p, params)
        finished = wait_finished(cluster, {"r0", "r1"}, limit=HEARTBEAT_S + 5)
        assert time.monotonic() - stopped < HEARTBEAT_S + 5
        reason = "decode instance (rank 1) sent no heartbeat for 3s: hung, killed"
        assert [(o.finish_reason, o.error) for o in finished.values()] == [("abort", reason)] * 2
        wait_until(lambda: not pid_alive(decode_pid), 5, "the hung instance is killed")
        assert cluster.health() == {"status": "unavailable",
                                    "dead_instances": [{"role": "decode", "rank": 1, "reason": reason}]}
        decode = decode_stats(cluster)
        assert not decode["alive"] and decode["num_running"] == decode["num_waiting"] == decode["kv_usage"] == 0
        with pytest.raises(ClusterUnavailable, match=r"no instance left to serve requests: decode instance \(rank 1\)"):
            cluster.add_request("after", prompts()[0], params)


def test_with_one_of_two_prefill_instances_dead_the_cluster_serves_on_degraded(tiny_checkpoint):
    with start(tiny_checkpoint, prefill_instances=2) as cluster:
        params = SamplingParams(temperature=0, max_tokens=240, ignore_eos=True)
        cluster.add_request("decoding", prompts()[0], params)  # the Conductor picks rank 0: both idle
        assert cluster.get_outputs(timeout=30), "no token within 30s"  # prefilled: it needs the decode instance only
        decode_pid = rank_pid(cluster, "decode")
        os.kill(decode_pid, signal.SIGSTOP)  # holds "decoding" where it is (unless it finished already)
        os.kill(rank_pid(cluster, "prefill"), signal.SIGKILL)  # rank 0
        wait_until(lambda: cluster.health()["status"] == "degraded", 10, "the parent notices the death")
        os.kill(decode_pid, signal.SIGCONT)
        assert cluster.health()["dead_instances"] == [
            {"role": "prefill", "rank": 0, "reason": "prefill instance (rank 0) died with exit code -9"}]
        cluster.add_request("new", prompts()[1], SamplingParams(temperature=0, max_tokens=5))
        finished = wait_finished(cluster, {"decoding", "new"}, limit=30)
        assert finished["decoding"].finish_reason == finished["new"].finish_reason == "length"


@pytest.mark.parametrize("colocated", [False, True])
def test_an_exception_while_handling_one_request_fails_only_that_request(tiny_checkpoint, colocated, monkeypatch):
    with start(tiny_checkpoint, colocated=colocated) as cluster:
        # past the parent's checks (every field of a message is checked again where it is
        # decoded, so the prompt's token ids are what an instance can still refuse)
        monkeypatch.setattr(cluster, "_validate", lambda *args: None)
        vocab = cluster.model_config.vocab_size
        cluster.add_request("bad", [1, vocab + 5], SamplingParams(temperature=0, max_tokens=4))
        cluster.add_request("good", prompts()[1], SamplingParams(temperature=0, max_tokens=4))
        finished = wait_finished(cluster, {"bad", "good"}, limit=30)
        assert finished["bad"].finish_reason == "abort"
        assert finished["bad"].error == f"ValueError: request 'bad': prompt token ids must be integers in [0, {vocab})"
        assert finished["good"].finish_reason == "length"
        assert cluster.is_healthy() and all(s["alive"] for s in cluster.stats())


def test_errors_that_reach_clients_are_one_line_without_server_paths():
    gloo = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:4021: Connection reset"
    assert error_line(gloo) == "[<path>] Read error [127.0.0.1]:4021: Connection reset"
    assert error_line("OSError: cannot open '/srv/models/x/config.json'\n  more") == "OSError: cannot open '<path>'"
    assert error_line("no KV from ranks [0] for 3s (12 tokens/s)") == "no KV from ranks [0] for 3s (12 tokens/s)"


PARENT_SCRIPT = """
import sys, time
from minicake.config import EngineConfig
from minicake.disagg.cluster import Cluster
cluster = Cluster(EngineConfig(model=sys.argv[1], device="cpu", num_kv_blocks=64, num_threads=1))
print(" ".join(str(p.pid) for p in cluster.procs), flush=True)
time.sleep(600)
"""


def test_no_instance_outlives_a_parent_killed_with_sigkill(tiny_checkpoint):
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(PARENT_SCRIPT), str(tiny_checkpoint("llama"))],
                              stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        pids = [int(x) for x in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
    finally:
        parent.kill()
        parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in pids), "an instance survived its parent"


SERVER_FLAGS = ("--max-model-len", "128", "--num-kv-blocks", "64", "--served-model-name", "tiny")
STREAM = {"prompt": "The quick brown fox", "max_tokens": 4, "ignore_eos": True, "stream": True}
TWO_PREFILL = ("--prefill", "2", "--decode", "1", "--scheduler", "load")


@contextlib.contextmanager
def serving(tiny_checkpoint, *flags: str):
    """`python -m minicake.serve` on the tiny Llama; killed on the way out if a test left it running."""
    server = ServerProcess("--model", str(tiny_checkpoint("llama")), *SERVER_FLAGS, *flags)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop(signal.SIGKILL, timeout=10)  # its instances die with it (PR_SET_PDEATHSIG)


def instance_processes(server: ServerProcess) -> list[psutil.Process]:
    """The server's instance processes in rank order (the order they were started in)."""
    procs = [p for p in server.descendants() if "minicake.disagg.worker" in p.cmdline()]
    return sorted(procs, key=lambda p: (p.create_time(), p.pid))


def stream_with_a_stuck_choice(server: ServerProcess, action) -> list[str]:
    """With prefill rank 1 frozen, stream two choices: the Conductor (TWO_PREFILL's `load`
    scheduler) sends choice 0 to rank 0, the first of two idle ones, and choice 1 to rank 1, the
    less busy then. Once choice 0 has finished, the stream waits for choice 1: call action(),
    return the stream's last two events."""
    with httpx.stream("POST", f"{server.url}/v1/completions", json=STREAM | {"n": 2}, timeout=60) as response:
        events = (line for line in response.iter_lines() if line)
        for event in events:
            choices = json.loads(event.removeprefix("data: "))["choices"]
            if choices[0]["index"] == 0 and choices[0]["finish_reason"] is not None:
                break
        action()
        return list(events)[-2:]


def health(server: ServerProcess) -> dict:
    return httpx.get(f"{server.url}/health", timeout=10).json()


def error_message(event: str) -> str:
    return json.loads(event.removeprefix("data: "))["error"]["message"]


def wait_gone(procs: list[psutil.Process], limit: float = 10) -> None:
    wait_until(lambda: not any(pid_alive(p.pid) for p in procs), limit, "every instance process exits")


def test_a_request_to_a_hung_decode_process_fails_within_the_heartbeat_timeout_and_the_server_exits_1(
        tiny_checkpoint):
    with serving(tiny_checkpoint, "--heartbeat-timeout", f"{HEARTBEAT_S:g}") as server:  # 1P + 1D
        prefill, decode = instance_processes(server)
        decode.suspend()  # SIGSTOP
        start_time = time.monotonic()
        response = httpx.post(f"{server.url}/v1/completions", json=STREAM, timeout=60)
        assert time.monotonic() - start_time < HEARTBEAT_S + 5
        assert response.status_code == 503, "an error envelope, not a stream that starts and fails"
        assert "decode instance (rank 1) sent no heartbeat for 3s: hung, killed" in response.json()["error"]["message"]
        assert server.proc.wait(timeout=30) == 1, "nothing can serve: it exits for its supervisor to restart it"
        wait_gone([prefill, decode])


def test_a_killed_prefill_process_of_two_ends_its_stream_and_the_server_serves_on_until_the_decode_dies(
        tiny_checkpoint):
    with serving(tiny_checkpoint, *TWO_PREFILL) as server:
        prefill0, prefill1, decode = instance_processes(server)
        prefill1.suspend()
        error, done = stream_with_a_stuck_choice(server, prefill1.kill)
        # the parent sees the death, or the decode side sees the K/V stream break: either names rank 1
        assert "rank 1" in error_message(error) and done == "data: [DONE]"
        wait_until(lambda: health(server)["status"] == "degraded", 10, "the parent notices the death")
        reason = "prefill instance (rank 1) died with exit code -9"
        assert health(server) == {"status": "degraded",
                                  "dead_instances": [{"role": "prefill", "rank": 1, "reason": reason}]}
        dead = (("rank", "1"), ("role", "prefill"))
        wait_until(lambda: server.metrics().get(("minicake:instance_alive", dead)) == 0, 10, "/metrics sees it")
        assert ("minicake:num_requests_running", dead) not in server.metrics(), "its gauges are gone"
        reply = httpx.post(f"{server.url}/v1/completions", timeout=60, json=STREAM | {"stream": False}).json()
        assert reply["choices"][0]["finish_reason"] == "length", "the survivors serve"
        decode.kill()
        assert server.proc.wait(timeout=30) == 1
        wait_gone([prefill0, decode])


def test_sigterm_ends_a_stream_still_running_after_the_grace_period_and_exits_0(tiny_checkpoint):
    with serving(tiny_checkpoint, *TWO_PREFILL, "--shutdown-grace", "3") as server:
        instances = instance_processes(server)
        instances[1].suspend()

        def sigterm():
            server.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: httpx.get(f"{server.url}/health", timeout=10).status_code == 503, 2, "draining")
            refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi"}, timeout=10)
            assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]

        error, done = stream_with_a_stuck_choice(server, sigterm)
        instances[1].resume()
        assert "the server is shutting down" in error_message(error) and done == "data: [DONE]"
        assert server.proc.wait(timeout=60) == 0
        wait_gone(instances)
