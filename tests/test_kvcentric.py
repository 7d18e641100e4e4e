"""KVCache-centric serving, live: the simulator's Conductor fed by instance reports routes real
requests; prefix blocks migrate between prefill instances; admission control refuses clearly."""
from minicake.cache.block_keys import block_keys
from minicake.conductor.conductor import ConductorConfig
from minicake.conductor.cost_model import CostModel
from minicake.conductor.live import HeldKeys, LiveConductor

BLOCK = 4
# prefill(N, C) = 0.01 * (N - C) s; decode step = 0.01 s + 0.001 s per request; a block moves in 1 ms
COST = CostModel("test", (0.0, 0.01, -0.01, 0.0, 0.0), (0.01, 0.001, 0.0), 0.001, BLOCK, 10_000)


def live(scheduler="kvcache", admission="none", num_prefill=2, **cfg):
    config = ConductorConfig(scheduler=scheduler, admission=admission, block_size=BLOCK, **cfg)
    return LiveConductor(config, COST, num_prefill, [1000])


def test_held_keys_reports_only_what_changed():
    held = HeldKeys()
    added, removed = held.diff({1, 2})
    assert sorted(added) == [1, 2] and removed == []
    assert held.diff({1, 2}) == ([], [])
    assert held.diff({2, 3}) == ([3], [1])


def test_kvcache_routing_sends_a_request_to_the_instance_that_reported_its_prefix():
    c = live()
    prompt = list(range(33))  # 8 full blocks
    c.on_keys(1, block_keys(prompt, BLOCK), [])
    d = c.schedule("a", prompt, 4)
    assert d.admitted and d.prefill_id == 1 and d.cached_tokens == 32 and d.fetch_from is None


def test_a_loaded_holder_makes_the_other_instance_fetch_the_prefix():
    c = live()
    prompt = list(range(33))
    c.on_keys(1, block_keys(prompt, BLOCK), [])
    c.prefill[1].busy_until_s = c.now() + 100  # instance 1 is busy for a long time
    d = c.schedule("a", prompt, 4)
    assert d.prefill_id == 0 and d.fetch_from == 1 and d.cached_blocks == 8 and d.local_blocks == 0


def test_tokens_and_finish_move_the_request_through_the_decode_state():
    c = live()
    d = c.schedule("a", list(range(10)), 5)
    assert c.decode[0].reserved_tokens == 15 and c.queued[d.prefill_id] == {"a": d.prefill_s}
    c.on_tokens("a", 1)  # the first token: the prefill is over
    assert c.queued[d.prefill_id] == {} and (c.decode[0].batch_size, c.decode[0].context_tokens) == (1, 11)
    c.on_tokens("a", 2)
    assert c.decode[0].context_tokens == 13
    c.on_finish("a")
    assert (c.decode[0].batch_size, c.decode[0].context_tokens, c.decode[0].reserved_tokens) == (0, 0, 0)
    assert c.conductor.num_finished == 1


def test_an_aborted_request_releases_its_queue_and_reservation():
    c = live()
    d = c.schedule("a", list(range(10)), 5)
    c.on_finish("a", aborted=True)
    assert c.queued[d.prefill_id] == {} and c.decode[0].reserved_tokens == 0 and not c.decode[0].members


def test_a_dead_prefill_instance_leaves_the_index_and_is_never_chosen():
    c = live()
    prompt = list(range(33))
    c.on_keys(1, block_keys(prompt, BLOCK), [])
    c.on_prefill_death(1)
    assert c.index.holders == {}
    assert all(c.schedule(f"r{i}", prompt, 4).prefill_id == 0 for i in range(3))


def test_early_admission_rejects_when_the_predicted_ttft_breaks_the_slo():
    c = live(admission="early", ttft_slo_s=0.5, num_prefill=1)
    c.prefill[0].busy_until_s = c.now() + 0.4
    d = c.schedule("queued", list(range(20)), 4)  # 0.2 s of prefill behind 0.4 s of queue
    assert not d.admitted and d.reason == "prefill overloaded" and c.retry_after_s(d) >= 1
    assert c.decode[0].reserved_tokens == 0 and not c.requests, "a rejection commits nothing"


# --- a live cluster: 2 prefill instances (small device caches, host pools) + 2 decode ---------
# Started once for the rest of this module (process start is slow on a small CPU); the last test
# kills an instance. "The Conductor believes instance i is busy" is set by hand where a test needs
# a routing decision to go one way: the same decision code then runs as it would under load. The
# Conductor predicts with COST, so a decode instance's predicted TBT grows with its batch.

import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from minicake.config import EngineConfig  # noqa: E402
from minicake.engine import Engine  # noqa: E402
from minicake.llm import LLM  # noqa: E402
from minicake.sampling import SamplingParams  # noqa: E402
from minicake.conductor.live import SLOUnreachable  # noqa: E402
from minicake.conductor.live import RequestRejected  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
SETTINGS = dict(device="cpu", block_size=BLOCK, num_kv_blocks=24, kv_pool_blocks=64, max_num_batched_tokens=32,
                num_threads=1, kv_transfer_timeout=20.0)


def tokens(n, seed):
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    with LLM(str(tiny_checkpoint("llama")), prefill_instances=2, decode_instances=2, cost=COST, **SETTINGS) as llm:
        yield llm


@pytest.fixture(scope="module")
def colocated(tiny_checkpoint):
    """The reference: one in-process engine without prefix caching (every token recomputed)."""
    engine = Engine(EngineConfig(model=str(tiny_checkpoint("llama")), device="cpu", block_size=BLOCK,
                                 num_kv_blocks=128, num_threads=1, enable_prefix_caching=False))

    def generate(prompts, params=GREEDY):
        for i, p in enumerate(prompts):
            engine.add_request(f"ref-{i}", p, params)
        out = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        return [out[f"ref-{i}"] for i in range(len(prompts))]
    return generate


def believe_busy(llm, instance, seconds):
    cluster = llm.engine.cluster
    with cluster._lock:
        cluster.conductor.prefill[instance].busy_until_s = cluster.conductor.now() + seconds


def holders(llm, prompt):
    """Instances the Conductor's index lists for each full block of the prompt."""
    index = llm.engine.cluster.conductor.index
    return [index.holders.get(k, set()) for k in block_keys(prompt, BLOCK)]


def rank_stats(llm, rank):
    return next(s for s in llm.engine.cluster.stats() if s["rank"] == rank)


def wait_for(condition, limit=10.0):
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_two_prefill_instances_give_the_colocated_greedy_tokens(llm, colocated):
    prompts = [tokens(n, seed) for seed, n in enumerate((5, 17, 40, 33, 21))]
    outputs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == colocated(prompts)


def test_a_prefix_migrates_from_another_instances_pool_with_the_same_tokens(llm, colocated):
    a = tokens(41, seed=100)
    believe_busy(llm, 1, 1e6)  # a, then two other prompts that push a off the device, go to 0
    llm.generate([a], GREEDY)
    llm.generate([tokens(60, seed=101)], GREEDY)
    llm.generate([tokens(60, seed=102)], GREEDY)
    believe_busy(llm, 1, 0)
    wait_for(lambda: all(h == {0} for h in holders(llm, a)))  # still held: in 0's host pool
    wait_for(lambda: rank_stats(llm, 0).get("kv_pool_blocks", 0) > 0)  # stats arrive a little later
    believe_busy(llm, 0, 1e6)  # the holder is busy: instance 1 pulls the prefix from it
    follow_up = a[:36] + tokens(8, seed=103)
    [out] = llm.generate([follow_up], GREEDY)
    believe_busy(llm, 0, 0)
    assert out.token_ids == colocated([follow_up])[0]
    assert out.num_cached_tokens == 36, "the 9 blocks came from instance 0 and were not recomputed"
    wait_for(lambda: rank_stats(llm, 1).get("num_fetched_blocks") == 9)
    wait_for(lambda: all(h == {0, 1} for h in holders(llm, follow_up)[:9]))  # the puller keeps them


def test_the_conductor_sends_a_request_to_the_decode_instance_with_the_lower_predicted_tbt(llm, colocated):
    """The first request decodes on instance 0 (both idle: a tie); while it runs, instance 0's
    predicted TBT counts it, so the next request goes to the idle instance 1. Tokens equal the
    colocated engine's, and afterwards no instance holds a block."""
    cluster = llm.engine.cluster
    transfers = rank_stats(llm, 3).get("num_transfers", 0)  # decode instance 1 is rank 3
    first, second = tokens(8, seed=300), tokens(20, seed=301)
    long = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    cluster.add_request("first", first, long)
    chosen = [cluster.conductor.requests["first"].decision.decode_id]
    outs = []
    wait_for(lambda: outs.extend(cluster.get_outputs(timeout=0.1)) or bool(outs))  # it decodes now
    cluster.add_request("second", second, GREEDY)
    chosen.append(cluster.conductor.requests["second"].decision.decode_id)
    wait_for(lambda: outs.extend(cluster.get_outputs(timeout=0.1)) or sum(o.finished for o in outs) == 2, limit=30)
    got = {rid: [t for o in outs if o.request_id == rid for t in o.new_token_ids] for rid in ("first", "second")}
    assert chosen == [0, 1]
    assert got["first"] == colocated([first], long)[0] and got["second"] == colocated([second])[0]
    wait_for(lambda: rank_stats(llm, 3).get("num_transfers") == transfers + 1)  # it ran on rank 3
    wait_for(lambda: all(s["num_free_blocks"] == s["num_blocks"] > 0 and s["num_running"] == 0
                         for s in cluster.stats()))
    assert not cluster._requests and not cluster.conductor.requests, "nothing left behind"
    assert all(d.reserved_tokens == d.batch_size == d.context_tokens == 0 for d in cluster.conductor.decode)


def test_admission_control_refuses_with_a_clear_error(llm):
    config = llm.engine.cluster.conductor.config
    config.admission = "early"
    believe_busy(llm, 0, 1e6)
    believe_busy(llm, 1, 1e6)
    try:
        with pytest.raises(RequestRejected, match=r"rejected by admission control \(early\): prefill overloaded"):
            llm.generate([tokens(20, seed=7)], GREEDY)
        config.ttft_slo_s = 1e-6  # no prefill can meet this SLO, however idle the cluster
        with pytest.raises(SLOUnreachable, match=r"\(early\): TTFT SLO unreachable, even alone on an idle cluster"):
            llm.generate([tokens(20, seed=7)], GREEDY)
    finally:
        config.admission, config.ttft_slo_s = "none", 30.0
        believe_busy(llm, 0, 0)
        believe_busy(llm, 1, 0)
    assert not llm.engine.cluster._requests, "a rejected request leaves nothing behind"


def test_a_dead_prefill_instance_leaves_the_index_and_its_requests_abort(llm):
    cluster = llm.engine.cluster
    prompt = tokens(30, seed=200)
    believe_busy(llm, 0, 1e6)
    llm.generate([prompt], GREEDY)  # computed on instance 1, which reports its blocks
    wait_for(lambda: all(1 in h for h in holders(llm, prompt)))
    pid = next(p.pid for s, p in zip(cluster.specs, cluster.procs) if s.rank == 1)
    os.kill(pid, signal.SIGSTOP)
    cluster.add_request("doomed", tokens(25, seed=201), GREEDY)  # routed to 1 (0 looks busy)
    os.kill(pid, signal.SIGKILL)
    outs = []
    wait_for(lambda: outs.extend(cluster.get_outputs(timeout=0.1)) or any(o.finished for o in outs), limit=20)
    [done] = [o for o in outs if o.finished]
    assert done.request_id == "doomed" and done.finish_reason == "abort" and "rank 1" in done.error
    # the decode side may report the failed transfer before the parent sees the process gone
    wait_for(lambda: not any(1 in h for h in cluster.conductor.index.holders.values()))  # its blocks left
    assert math.isinf(cluster.conductor.prefill[1].busy_until_s)
    believe_busy(llm, 0, 0)
    [out] = llm.generate([prompt], GREEDY)  # served by the survivor
    assert out.finish_reason == "length"


def test_the_server_answers_an_unreachable_slo_with_400_and_no_retry_after(tiny_checkpoint):
    import httpx
    from server_process import ServerProcess
    server = ServerProcess("--model", str(tiny_checkpoint("llama")), "--prefill", "2", "--decode", "1",
                           "--block-size", "4", "--num-kv-blocks", "64", "--max-model-len", "128",
                           "--admission", "early", "--ttft-slo", "0.000001", "--tbt-slo", "10",
                           "--served-model-name", "tiny")
    try:
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2},
                       timeout=60)
        error = r.json()["error"]
        assert r.status_code == 400 and "retry-after" not in r.headers  # a 400 stops clients' automatic retries
        assert error["code"] == "slo_unreachable" and error["param"] == "prompt"
        assert "(early): TTFT SLO unreachable, even alone on an idle cluster" in error["message"]
    finally:
        assert server.stop() == 0


def test_simulated_decode_entry_waits_for_the_decode_step_in_progress():
    """In the live cluster a request enters, and its first token leaves, through its decode
    instance's loop: the simulator's decode_entry charges the wait for the step in progress."""
    from minicake.conductor.conductor import Request as SimRequest
    from minicake.sim.simulator import SimConfig, Simulator
    from minicake.sim.trace import TraceEntry
    cost = CostModel("steps", (0.0, 0.01, -0.01, 0.0, 0.0), (0.1, 0.0, 0.0), 0.001, BLOCK, 10_000)
    trace = [TraceEntry(0.0, SimRequest(0, 10, 5, [])), TraceEntry(0.15, SimRequest(1, 5, 5, []))]

    def ttft(decode_entry):
        sim = Simulator(SimConfig(num_prefill=1, num_decode=1, decode_entry=decode_entry),
                        ConductorConfig(block_size=BLOCK), cost, trace)
        r = sim.run()
        return list(r.first_token_s - r.arrival_s)
    # request 1 arrives mid-step (0.1..0.2): dispatched at 0.2, prefilled by 0.25, joins at the step end 0.3
    assert ttft(True) == pytest.approx([0.1, 0.15])
    assert ttft(False) == pytest.approx([0.1, 0.05])
