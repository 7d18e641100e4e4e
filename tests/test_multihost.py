"""Two hosts on one machine, and the control plane's door closed to strangers.

Node 0 binds 127.0.0.1 and node 1 127.0.0.2 (Linux routes all of 127/8 to the loopback device),
each its own `python -m minicake.serve` command with torchrun's flags, as on two machines: node 0
runs the HTTP server, the Conductor and the prefill instance, node 1 a decode instance; K/V cross
over gloo. The last tests send an instance what a process outside the cluster could: a message
signed with another token, and bytes that are no message at all.
"""
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time

import httpx
import msgpack
import openai
import psutil
import pytest
import zmq
from server_process import ServerProcess, free_port

from minicake.disagg import codec
from minicake.disagg.cluster import Cluster
from minicake.disagg.messages import Abort, NewRequest
from minicake.llm import LLM
from minicake.sampling import SamplingParams
from test_disagg import prompts, settled_stats, tiny_config
from test_faults import pid_alive, wait_finished, wait_until

# 16 blocks of 16 tokens per instance: two requests of 200 tokens do not fit one decode instance
ENGINE_FLAGS = ("--max-model-len", "256", "--num-kv-blocks", "16", "--served-model-name", "tiny")
HEARTBEAT_S = 10.0  # node 0 declares node 1 gone after this long (a loaded 2-core machine needs room)


@contextlib.contextmanager
def two_nodes(tiny_checkpoint, tmp_path, node0: tuple, node1: tuple):
    """Node 1 (127.0.0.2) started first, as on a second machine, then node 0 (127.0.0.1), which
    serves once node 1 joined. The token reaches node 1 through its environment, node 0 by flag."""
    token, port = secrets.token_hex(16), free_port()
    network = ("--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port))
    log = open(tmp_path / "node1.log", "w")
    node_1 = subprocess.Popen([sys.executable, "-m", "minicake.serve", *network, "--node-rank", "1",
                               "--bind-addr", "127.0.0.2", *node1], stdout=log, stderr=subprocess.STDOUT,
                              env=os.environ | {"MINICAKE_CLUSTER_TOKEN": token, "OMP_NUM_THREADS": "1"})
    server = None
    try:
        server = ServerProcess("--model", str(tiny_checkpoint("llama")), *ENGINE_FLAGS, *network, "--node-rank", "0",
                               "--cluster-token", token, "--heartbeat-timeout", f"{HEARTBEAT_S:g}", *node0)
        yield server, node_1
    finally:
        if server is not None and server.proc.poll() is None:
            server.stop(signal.SIGKILL, timeout=10)
        if node_1.poll() is None:
            node_1.kill()
        node_1.wait(timeout=10)
        log.close()


def test_a_decode_instance_on_a_second_host_generates_what_one_engine_generates(tiny_checkpoint, tmp_path):
    prompt = prompts()[2]
    expected = LLM(str(tiny_checkpoint("llama")), device="cpu", max_model_len=256).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    with two_nodes(tiny_checkpoint, tmp_path, ("--prefill", "1", "--decode", "0"),
                   ("--prefill", "0", "--decode", "1")) as (server, node_1):
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        chunks = [c.choices[0] for c in stream]
        assert "".join(c.text for c in chunks) == expected.text
        assert chunks[-1].finish_reason == "length"
        assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok", "dead_instances": []}
        workers = [p for p in psutil.Process(node_1.pid).children() if "minicake.disagg.worker" in p.cmdline()]
        assert len(workers) == 1 and "127.0.0.2" in workers[0].cmdline(), "the decode instance runs on node 1"
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
        assert node_1.wait(timeout=30) == 0, "SIGTERM on node 0 ends node 1 too"
        assert not pid_alive(workers[0].pid)


def test_killing_the_second_host_mid_stream_ends_the_stream_and_node_0_serves_on(tiny_checkpoint, tmp_path):
    # Both choices of one request reserve 200 tokens of decode KV: choice 0 takes node 0's
    # decode instance (rank 1), choice 1 cannot fit beside it and goes to node 1's (rank 2).
    with two_nodes(tiny_checkpoint, tmp_path, ("--prefill", "1", "--decode", "1"),
                   ("--prefill", "0", "--decode", "1")) as (server, node_1):
        worker = next(p for p in psutil.Process(node_1.pid).children() if "minicake.disagg.worker" in p.cmdline())
        body = {"prompt": "The quick brown fox", "max_tokens": 200, "ignore_eos": True, "stream": True, "n": 2}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
            events = (line for line in response.iter_lines() if line)
            for event in events:
                assert "choices" in event, event  # not an error
                if json.loads(event.removeprefix("data: "))["choices"][0]["index"] == 1:
                    worker.suspend()  # choice 1 stops where it is, then its host goes
                    node_1.kill()
                    break
            error, done = list(events)[-2:]
        assert done == "data: [DONE]"
        message = json.loads(error.removeprefix("data: "))["error"]["message"]
        assert "decode instance (rank 2) is gone with node 1 (127.0.0.2)" in message, message
        wait_until(lambda: not pid_alive(worker.pid), 10, "node 1's instance dies with its node")
        health = httpx.get(f"{server.url}/health", timeout=10).json()
        assert health["status"] == "degraded"
        assert [(d["role"], d["rank"]) for d in health["dead_instances"]] == [("decode", 2)]
        reply = httpx.post(f"{server.url}/v1/completions", timeout=60,
                           json={"prompt": "Hi", "max_tokens": 4, "ignore_eos": True}).json()
        assert reply["choices"][0]["finish_reason"] == "length", "node 0's instances serve on"
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_node_0_names_a_node_that_never_joins(tiny_checkpoint):
    node_0 = subprocess.run([sys.executable, "-m", "minicake.serve", "--model", str(tiny_checkpoint("llama")),
                             "--device", "cpu", "--nnodes", "2", "--master-port", str(free_port()),
                             "--cluster-token", "t", "--join-timeout", "2"],
                            capture_output=True, text=True, timeout=120)
    assert node_0.returncode == 1
    assert "node(s) 1 of --nnodes 2 did not join within 2s" in node_0.stderr


def test_node_0_names_a_node_that_dies_while_its_instances_start(tiny_checkpoint, tmp_path):
    token, port = secrets.token_hex(16), free_port()
    network = ("--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port), "--cluster-token", token)
    with open(tmp_path / "node1.log", "w") as log:
        node_1 = subprocess.Popen([sys.executable, "-m", "minicake.serve", *network, "--node-rank", "1",
                                   "--bind-addr", "127.0.0.2", "--prefill", "0", "--decode", "1"],
                                  stdout=log, stderr=subprocess.STDOUT)
    node_0 = subprocess.Popen([sys.executable, "-m", "minicake.serve", "--model", str(tiny_checkpoint("llama")),
                               "--device", "cpu", *ENGINE_FLAGS, *network, "--node-rank", "0", "--prefill", "1",
                               "--decode", "0", "--heartbeat-timeout", "3"], stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: any("minicake.disagg.worker" in p.cmdline() for p in psutil.Process(node_1.pid).children()),
                   60, "node 1 starts its decode instance")
        time.sleep(1.0)  # its Launched, sent just before, has left for node 0
        node_1.kill()  # its worker dies with it
        assert node_0.wait(timeout=60) == 1, "node 0 gives up well before its 300 s start timeout"
        assert "node 1 (127.0.0.2) went silent while its instances started" in node_0.stderr.read()
    finally:
        for p in (node_0, node_1):
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


def push(address: str, frames: list[bytes]) -> None:
    with zmq.Context() as context, context.socket(zmq.PUSH) as sock:
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(address)
        sock.send_multipart(frames)


def test_messages_from_outside_the_cluster_are_dropped_and_logged_once(tiny_checkpoint, capfd):
    with Cluster(tiny_config(tiny_checkpoint("llama")), prefill_instances=1, decode_instances=1) as cluster:
        decode = cluster._mailbox.peers[1]  # the decode instance's inbox
        payload = codec.encode(Abort("anything"))
        for _ in range(3):
            push(decode, [codec.sign(b"not the cluster's token", payload), payload])
        push(decode, [b"\x93\xff malformed"])
        cluster.add_request("after", prompts()[1], SamplingParams(temperature=0, max_tokens=4))
        assert wait_finished(cluster, {"after"}, limit=30)["after"].finish_reason == "length"
        assert cluster.is_healthy() and all(s["alive"] for s in settled_stats(cluster))
    log = capfd.readouterr().err
    assert log.count("dropped a message from 127.0.0.1: bad signature: not signed with this cluster's token") == 1
    assert log.count("dropped a message from 127.0.0.1: not the 2 frames of a message") == 1


def test_the_codec_builds_only_message_classes_with_their_own_checks():
    msg = NewRequest("r", [1, 2, 3], SamplingParams(temperature=0.5, seed=7), 9, (0, 1), fetch_from=None)
    assert codec.decode(codec.encode(msg)) == msg, "tuples stay tuples, nested classes are rebuilt"
    refused = {
        b"\xc1": "not msgpack",
        msgpack.packb({"type": "Popen", "args": ["sh"]}): "unknown message type 'Popen'",
        msgpack.packb({"type": "Abort", "request_id": "r", "shell": True}): "Abort has no field(s) 'shell'",
        msgpack.packb({"type": "SamplingParams", "temperature": -1.0}): "temperature must be",
        msgpack.packb([1, 2]): "not a message",
    }
    for data, reason in refused.items():
        with pytest.raises(codec.DecodeError, match=re.escape(reason)):
            codec.decode(data)
    assert codec.verify(b"k", b"payload", codec.sign(b"k", b"payload"))
    assert not codec.verify(b"other", b"payload", codec.sign(b"k", b"payload"))
