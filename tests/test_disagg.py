"""Disaggregated prefill and decode compute what the colocated engine computes.

Three clusters of the tiny Llama checkpoint are started once for the module (process start-up
is slow on a small CPU): one colocated engine, 1 prefill + 1 decode, and a 2-stage pipelined
prefill group + 1 decode. Chunks are 32 tokens and blocks 4 tokens, so prompts span several
chunks, and a prompt that shares a prefix with an earlier one finds it cached on both sides.
The 1P+1D cluster runs at most 2 sequences at once, so a batch of 5 waits for room.
"""
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from minicake.config import EngineConfig
from minicake.llm import LLM
from minicake.sampling import SamplingParams
from minicake.disagg.cluster import Cluster
from minicake.disagg.pipeline import stage_layers

PROMPT_LENS = [5, 17, 40, 90, 33]


def tiny_config(path, **overrides) -> EngineConfig:
    settings = dict(model=str(path), device="cpu", block_size=4, num_kv_blocks=160, max_num_batched_tokens=32,
                    max_num_seqs=8, num_threads=1, kv_transfer_timeout=20.0)
    return EngineConfig(**(settings | overrides))


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in PROMPT_LENS]


def run(cluster: Cluster, batch: dict[str, list[int]], params: SamplingParams, limit: float = 60.0) -> dict:
    """Submit every prompt, wait for all to finish; request id -> (tokens, reason, cached)."""
    for request_id, prompt in batch.items():
        cluster.add_request(request_id, prompt, params)
    results = {rid: ([], None, 0) for rid in batch}
    deadline = time.monotonic() + limit
    while any(r[1] is None for r in results.values()):
        assert time.monotonic() < deadline, f"no answer within {limit}s: {results}"
        for out in cluster.get_outputs(timeout=0.5):
            tokens, _, _ = results[out.request_id]
            results[out.request_id] = (tokens + out.new_token_ids, out.finish_reason, out.num_cached_tokens)
    return results


def settled_stats(cluster: Cluster, limit: float = 10.0) -> list[dict]:
    """The instances' stats once no block is in use anywhere (or the last seen after `limit`)."""
    deadline = time.monotonic() + limit
    while True:
        stats = cluster.stats()
        if all(s["num_free_blocks"] == s["num_blocks"] and s["num_running"] == 0 for s in stats) \
                or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


@pytest.fixture(scope="module")
def clusters(tiny_checkpoint):
    config = tiny_config(tiny_checkpoint("llama"))
    started = {}
    try:
        started["colocated"] = Cluster(config, colocated=True)
        started["1P+1D"] = Cluster(replace(config, max_num_seqs=2), prefill_instances=1, decode_instances=1)
        started["2-stage+1D"] = Cluster(config, pipeline_stages=2)
        yield started
    finally:
        for cluster in started.values():
            cluster.close()


def generate_all(cluster: Cluster, params: SamplingParams, tag: str) -> dict:
    """The mixed batch, then a prompt sharing the 90-token prompt's first 64 tokens."""
    batch = {f"{tag}-{i}": p for i, p in enumerate(prompts())}
    results = run(cluster, batch, params)
    shared = batch[f"{tag}-3"][:64] + [7, 8, 9, 10, 11]
    results |= run(cluster, {f"{tag}-prefix": shared}, params)
    return results


@pytest.mark.parametrize("mode", ["1P+1D", "2-stage+1D"])
def test_greedy_tokens_equal_the_colocated_engine(clusters, mode):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = generate_all(clusters["colocated"], params, "g")
    got = generate_all(clusters[mode], params, "g")
    for rid, (tokens, reason, _) in expected.items():
        assert got[rid][0] == tokens, f"{mode}: {rid} differs"
        assert got[rid][1] == reason == "length"
    assert got["g-prefix"][2] == 64, "the shared prefix is served from the prefill instance's cache"


def test_seeded_sampling_continues_on_the_decode_instance(clusters):
    params = SamplingParams(temperature=0.9, top_k=50, seed=123, max_tokens=8, ignore_eos=True)
    batch = {"s-0": prompts()[2]}
    expected = run(clusters["colocated"], batch, params)
    assert run(clusters["1P+1D"], batch, params)["s-0"][0] == expected["s-0"][0]


def test_the_decode_instance_runs_at_most_max_num_seqs_requests(clusters):
    cluster, params = clusters["1P+1D"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert cluster.config.max_num_seqs == 2
    batch = {f"m-{i}": p for i, p in enumerate(prompts()[:4])}
    for request_id, prompt in batch.items():
        cluster.add_request(request_id, prompt, params)
    tokens, decoding, finished = {rid: [] for rid in batch}, set(), set()
    most_decoding = most_running = 0
    deadline = time.monotonic() + 60
    while finished != set(batch):
        assert time.monotonic() < deadline, f"only {sorted(finished)} finished within 60s"
        for out in cluster.get_outputs(timeout=0.2):  # in the order the decode instance emitted them
            tokens[out.request_id] += out.new_token_ids
            decoding.add(out.request_id)  # from its first token on
            most_decoding = max(most_decoding, len(decoding))
            if out.finished:
                decoding.discard(out.request_id)
                finished.add(out.request_id)
        most_running = max(most_running, next(s for s in cluster.stats() if s["role"] == "decode")["num_running"])
    assert most_decoding <= 2 and most_running <= 2, "the others waited with their K/V received"
    expected = run(clusters["colocated"], batch, params)
    assert tokens == {rid: t for rid, (t, _, _) in expected.items()}


def test_decode_instance_keeps_prompt_blocks_and_receives_only_the_missing_ones(clusters):
    cluster = clusters["1P+1D"]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = prompts()[3]
    before = {s["role"]: s["prefix_hits_tokens"] for s in settled_stats(cluster)}
    run(cluster, {"held-0": prompt}, params)
    run(cluster, {"held-1": prompt[:80] + [1, 2, 3]}, params)
    after = {s["role"]: s["prefix_hits_tokens"] for s in settled_stats(cluster)}
    assert after["decode"] - before["decode"] >= 80, "the decode side reuses the 80 tokens it holds"


def test_abort_frees_the_request_on_every_instance(clusters):
    for cluster in (clusters["1P+1D"], clusters["2-stage+1D"]):
        cluster.add_request("long", prompts()[3], SamplingParams(temperature=0, max_tokens=150, ignore_eos=True))
        assert cluster.get_outputs(timeout=30), "no token within 30s"
        cluster.abort_request("long")
        outs, deadline = [], time.monotonic() + 30
        while not any(o.request_id == "long" and o.finished for o in outs):
            assert time.monotonic() < deadline, "the abort is reported within 30s"
            outs += cluster.get_outputs(timeout=1)
        assert outs[-1].finish_reason == "abort"
        stats = settled_stats(cluster)
        assert all(s["num_free_blocks"] == s["num_blocks"] for s in stats), stats


def test_every_block_is_free_after_the_requests_finish(clusters):
    for name, cluster in clusters.items():
        stats = settled_stats(cluster)
        assert all(s["num_blocks"] > 0 for s in stats), f"{name}: every instance reported its stats"
        assert [s["num_free_blocks"] for s in stats] == [s["num_blocks"] for s in stats], name
        assert cluster.is_healthy() and all(s["alive"] for s in stats)


def test_bad_requests_are_refused_in_the_parent(clusters):
    cluster = clusters["1P+1D"]
    with pytest.raises(ValueError, match="empty"):
        cluster.add_request("e", [], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len is 256"):
        cluster.add_request("l", [1] * 300, SamplingParams())
    changed = SamplingParams(seed=1)
    changed.seed = 2**64  # set after its checks ran: each instance would refuse it
    with pytest.raises(ValueError, match="seed"):
        cluster.add_request("s", [1, 2], changed)
    with pytest.raises(ValueError, match="pipeline_stages=3 exceeds the model's 2 layers"):
        Cluster(cluster.config, pipeline_stages=3)


def test_llm_switches_to_disaggregated_with_one_argument(tiny_checkpoint):
    settings = dict(device="cpu", block_size=4, num_kv_blocks=160, max_num_batched_tokens=32, num_threads=1)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    batch = prompts()[:3]
    expected = [o.token_ids for o in LLM(str(tiny_checkpoint("llama")), **settings).generate(batch, params)]
    with LLM(str(tiny_checkpoint("llama")), prefill_instances=1, **settings) as llm:
        outputs = llm.generate(batch, params)
        assert [o.token_ids for o in outputs] == expected
        assert [o.finish_reason for o in outputs] == ["length"] * 3
    assert not llm.engine.cluster.is_healthy(), "closed with the with-block"


NO_MAIN_GUARD = """
import sys
from minicake import LLM, SamplingParams
llm = LLM(sys.argv[1], prefill_instances=1, decode_instances=1, device="cpu", block_size=4, num_kv_blocks=64,
          num_threads=1)
print(llm.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].token_ids)
"""


@pytest.mark.parametrize("how", ["file", "stdin"])
def test_a_script_without_a_main_guard_runs_a_cluster(tiny_checkpoint, tmp_path, how):
    """The instances are programs of their own: nothing re-imports the script (or stdin)."""
    model = str(tiny_checkpoint("llama"))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    expected = LLM(model, device="cpu", block_size=4, num_kv_blocks=64).generate([[5, 6, 7, 8, 9]], params)
    script = tmp_path / "script.py"
    script.write_text(NO_MAIN_GUARD)
    argv = [sys.executable, str(script) if how == "file" else "-", model]
    with open(script) as stdin:
        done = subprocess.run(argv, stdin=stdin, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(expected[0].token_ids)


def test_pipeline_stages_split_the_layers_into_contiguous_ranges():
    ranges = [stage_layers(30, 4, s) for s in range(4)]
    assert [len(r) for r in ranges] == [8, 8, 7, 7]
    assert [i for r in ranges for i in r] == list(range(30))
