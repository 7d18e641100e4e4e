"""On GPUs, over NCCL: disaggregated clusters compute what the colocated engine computes, and a
killed instance aborts only its requests. Skipped without enough GPUs (one per instance
process; NCCL cannot put two ranks on one GPU) and under Triton's interpreter: benchmarks/
gpu_check.sh runs them with the kernels compiled (TRITON_INTERPRET=0). float32, so that a
different batching on the two sides cannot flip a greedy token.
"""
import os
import signal

import pytest
import torch

from minicake.disagg.cluster import Cluster
from minicake.sampling import SamplingParams
from test_disagg import prompts, run, settled_stats, tiny_config
from test_faults import rank_pid, start_generating, wait_finished, wait_until

COMPILED = os.environ.get("TRITON_INTERPRET") == "0"


def need_gpus(n: int) -> None:
    if not (COMPILED and torch.cuda.is_available() and torch.cuda.device_count() >= n):
        pytest.skip(f"needs {n} CUDA GPUs and compiled Triton (TRITON_INTERPRET=0)")


def gpu_config(tiny_checkpoint, **overrides):
    return tiny_config(tiny_checkpoint("llama"), device="cuda", dtype="float32", **overrides)


def greedy_tokens(cluster: Cluster) -> dict:
    batch = {f"r{i}": p for i, p in enumerate(prompts())}
    results = run(cluster, batch, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    return {rid: tokens for rid, (tokens, _, _) in results.items()}


@pytest.fixture(scope="module")
def colocated_tokens(tiny_checkpoint) -> dict:
    """The colocated engine's greedy tokens on one GPU: the reference of every layout."""
    need_gpus(1)
    with Cluster(gpu_config(tiny_checkpoint), colocated=True) as colocated:
        return greedy_tokens(colocated)


@pytest.mark.parametrize("layout, num_gpus", [({"prefill_instances": 1}, 2), ({"prefill_instances": 2}, 3),
                                              ({"pipeline_stages": 2}, 3)], ids=["1P+1D", "2P+1D", "2-stage+1D"])
def test_nccl_clusters_give_the_colocated_engines_greedy_tokens(tiny_checkpoint, colocated_tokens, layout, num_gpus):
    need_gpus(num_gpus)
    with Cluster(gpu_config(tiny_checkpoint), decode_instances=1, **layout) as cluster:
        assert greedy_tokens(cluster) == colocated_tokens
        assert all(s["num_free_blocks"] == s["num_blocks"] for s in settled_stats(cluster)), "every block returned"


def test_a_killed_decode_instance_aborts_its_requests_and_the_prefill_instance_lives_on(tiny_checkpoint):
    need_gpus(2)
    with Cluster(gpu_config(tiny_checkpoint, kv_transfer_timeout=3.0), prefill_instances=1) as cluster:
        request_ids = start_generating(cluster)
        os.kill(rank_pid(cluster, "decode"), signal.SIGKILL)
        finished = wait_finished(cluster, request_ids, limit=10)
        assert {o.finish_reason for o in finished.values()} == {"abort"}
        prefill = next(s for s in settled_stats(cluster) if s["role"] == "prefill")
        assert prefill["alive"] and prefill["num_free_blocks"] == prefill["num_blocks"]


def test_with_one_of_two_prefill_instances_killed_the_nccl_cluster_serves_on(tiny_checkpoint):
    need_gpus(3)
    with Cluster(gpu_config(tiny_checkpoint, kv_transfer_timeout=3.0), prefill_instances=2) as cluster:
        os.kill(rank_pid(cluster, "prefill"), signal.SIGKILL)  # rank 0
        wait_until(lambda: cluster.health()["status"] == "degraded", 10, "the parent notices the death")
        cluster.add_request("new", prompts()[1], SamplingParams(temperature=0, max_tokens=5))
        assert wait_finished(cluster, {"new"}, limit=30)["new"].finish_reason == "length"
