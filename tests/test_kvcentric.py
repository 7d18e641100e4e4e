"""KVCache-centric serving, live: the simulator's Conductor fed by instance reports routes real
requests; prefix blocks migrate between prefill instances; admission control refuses clearly."""
from minicake.cache.block_keys import block_keys
from minicake.sched.conductor import ConductorConfig
from minicake.sched.cost_model import CostModel
from minicake.sched.live import HeldKeys, LiveConductor

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


def test_first_token_and_finish_move_the_request_through_the_decode_state():
    c = live()
    d = c.schedule("a", list(range(10)), 5)
    assert c.decode[0].reserved_tokens == 15 and c.queued[d.prefill_id] == {"a": d.prefill_s}
    c.on_first_token("a")
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
    c = live(admission="early", ttft_slo_s=0.5)
    d = c.schedule("long", list(range(80)), 4)  # 0.8 s of prefill predicted
    assert not d.admitted and d.reason == "prefill overloaded" and c.retry_after_s(d) >= 1.0
    assert c.decode[0].reserved_tokens == 0 and not c.requests, "a rejection commits nothing"
