"""The Conductor's decisions on hand-built clusters (docs/design.md: Prefill choice, Decode choice, Admission control).

A toy cost model keeps the numbers readable: blocks of 4 tokens, prefill 1 ms per computed
token, fetch 10 ms per block, decode step 10 ms + 1 us per context token.
"""
import pytest

from minicake.cache.block_keys import block_keys
from minicake.conductor.conductor import (BlockIndex, Conductor, ConductorConfig, DecodeMember, DecodeState,
                                      PrefillState, Request, request_from_tokens)
from minicake.conductor.cost_model import CostModel
from minicake.conductor.live import LiveConductor

TOY = CostModel("toy", prefill_coef=(0.0, 1e-3, -1e-3, 0.0, 0.0), decode_coef=(0.01, 0.0, 1e-6),
                transfer_s_per_block=0.01, block_size=4, kv_capacity_tokens=1000)


def cluster(num_prefill=2, num_decode=1, **config):
    config = {"block_size": 4, **config}
    index = BlockIndex()
    prefill = [PrefillState(i) for i in range(num_prefill)]
    decode = [DecodeState(i, TOY.kv_capacity_tokens) for i in range(num_decode)]
    return Conductor(ConductorConfig(**config), TOY, prefill, decode, index), index


def request(rid=0, blocks=8, new_tokens=10, first_id=0):
    keys = block_keys(list(range(first_id, first_id + blocks)), block_size=1)
    return Request(rid, prompt_len=4 * blocks, max_new_tokens=new_tokens, block_keys=keys)


def test_block_index_match_stops_at_the_first_missing_block():
    index = BlockIndex()
    keys = request(blocks=6).block_keys
    index.add(0, keys[:4])
    index.add(1, keys[:2] + keys[3:])  # holds blocks 3.. but not block 2: only 2 lead
    assert index.match_lens(keys, 3) == [4, 2, 0]
    index.remove(0, keys[2:4])
    assert index.match_lens(keys, 3) == [2, 2, 0]


def test_requests_from_token_ids_match_on_their_shared_full_blocks():
    conductor, index = cluster(scheduler="cache-local")
    first = request_from_tokens(0, list(range(10)), 4, block_size=4)   # blocks [0..3] [4..7], 2 tokens left
    second = request_from_tokens(1, list(range(8)) + [99] * 6, 4, block_size=4)
    index.add(1, first.block_keys)
    d = conductor.schedule(second, now=0.0)
    assert (d.prefill_id, d.cached_blocks, d.cached_tokens) == (1, 2, 8)


def test_cached_instance_wins_when_its_queue_is_short():
    conductor, index = cluster(scheduler="cache-local")
    req = request(blocks=8)
    index.add(1, req.block_keys)
    d = conductor.schedule(req, now=0.0)
    assert (d.prefill_id, d.cached_blocks, d.cached_tokens) == (1, 8, 31)  # the last token is computed
    assert d.ttft_s == pytest.approx(1e-3)


def test_cached_instance_loses_when_its_queue_is_long():
    conductor, index = cluster(scheduler="cache-local")
    req = request(blocks=8)
    index.add(1, req.block_keys)
    conductor.prefill[1].busy_until_s = 1.0  # a second of prefills wait there; recomputing takes 32 ms
    d = conductor.schedule(req, now=0.0)
    assert (d.prefill_id, d.cached_blocks, d.fetch_from) == (0, 0, None)
    assert d.ttft_s == pytest.approx(0.032)
    assert conductor.prefill[0].busy_until_s == pytest.approx(0.032)  # its queue grew by the prediction


@pytest.mark.parametrize("threshold, fetches", [(1.5, False), (1.2, True)])
def test_balancing_threshold_switches_between_recompute_and_fetch(threshold, fetches):
    conductor, index = cluster(scheduler="kvcache", kvcache_balancing_threshold=threshold)
    req = request(blocks=8)
    index.add(0, req.block_keys)       # best_len 8, on a busy instance
    index.add(1, req.block_keys[:6])   # len_1 = 6: best_len / len_1 = 1.33
    conductor.prefill[0].busy_until_s = 1.0
    d = conductor.schedule(req, now=0.0)
    assert d.prefill_id == 1 and d.local_blocks == 6
    if fetches:
        assert (d.fetch_from, d.cached_blocks) == (0, 8)
        assert d.prefill_s == pytest.approx(2 * 0.01 + 1e-3)  # pull 2 blocks, compute the last token
    else:
        assert (d.fetch_from, d.cached_blocks) == (None, 6)
        assert d.prefill_s == pytest.approx(8 * 1e-3)  # recompute blocks 6 and 7


def test_an_instance_with_nothing_cached_always_fetches():
    conductor, index = cluster(scheduler="kvcache")
    req = request(blocks=8)
    index.add(0, req.block_keys)
    conductor.prefill[0].busy_until_s = 1.0
    d = conductor.schedule(req, now=0.0)
    assert (d.prefill_id, d.fetch_from, d.local_blocks, d.cached_blocks) == (1, 0, 0, 8)


def test_a_local_pool_never_fetches():
    conductor, index = cluster(scheduler="kvcache", can_fetch=False)
    req = request(blocks=8)
    index.add(0, req.block_keys)
    conductor.prefill[0].busy_until_s = 1.0
    d = conductor.schedule(req, now=0.0)
    assert (d.prefill_id, d.fetch_from, d.cached_blocks) == (1, None, 0)


def test_load_scheduler_picks_the_shortest_queue_even_without_cache():
    conductor, index = cluster(scheduler="load")
    req = request(blocks=8)
    index.add(0, req.block_keys)
    conductor.prefill[0].busy_until_s = 0.01
    d = conductor.schedule(req, now=0.0)
    assert (d.prefill_id, d.cached_blocks) == (1, 0)


def test_decode_instance_with_the_lowest_predicted_tbt_and_room_is_chosen():
    conductor, _ = cluster(num_decode=3)
    conductor.decode[0].context_tokens = 500                 # slower step
    conductor.decode[1].reserved_tokens = 990                # no room for 32 + 10 tokens
    d = conductor.schedule(request(), now=0.0)
    assert d.decode_id == 2
    assert d.tbt_s == pytest.approx(0.01 + 32e-6)
    assert conductor.decode[2].reserved_tokens == 42


def test_no_admission_control_admits_a_hopeless_request():
    conductor, _ = cluster(admission="none", ttft_slo_s=0.001)
    assert conductor.schedule(request(), now=0.0).admitted


def test_a_request_that_breaks_the_ttft_slo_even_alone_is_unreachable_not_overloaded():
    conductor, _ = cluster(admission="early", ttft_slo_s=0.03)
    d = conductor.schedule(request(blocks=8), now=0.0)  # 32 tokens: 32 ms of prefill on an idle cluster
    assert not d.admitted and d.unreachable and d.reason == "TTFT SLO unreachable"
    assert d.ttft_s == pytest.approx(0.032) and d.tbt_s == pytest.approx(0.01 + 32e-6)  # both alone
    conductor.prefill[0].busy_until_s = conductor.prefill[1].busy_until_s = 0.02
    d = conductor.schedule(request(1, blocks=4), now=0.0)  # 16 ms alone, but 36 ms behind the queues
    assert d.reason == "prefill overloaded" and not d.unreachable


def test_a_request_that_breaks_the_tbt_slo_even_in_a_batch_of_its_own_is_unreachable():
    conductor, _ = cluster(admission="predictive", tbt_slo_s=0.01)  # a step alone takes 10 ms + 1 us per token
    d = conductor.schedule(request(), now=0.0)
    assert d.reason == "TBT SLO unreachable" and d.tbt_s == pytest.approx(0.01 + 32e-6)
    assert conductor.decode[0].reserved_tokens == 0 and conductor.prefill[0].busy_until_s == 0.0, "nothing committed"


def test_retry_after_is_when_the_predicted_queue_has_drained_enough_to_meet_the_slo():
    live = LiveConductor(ConductorConfig(admission="early", ttft_slo_s=0.5, block_size=4), TOY, 1, [1000])
    waits = []
    for queue_s in (1.0, 4.0, 9.0):
        live.prefill[0].busy_until_s = live.now() + queue_s
        d = live.schedule(f"r{queue_s}", list(range(200)), 4)  # 0.2 s of prefill: the SLO is met 0.3 s early
        assert d.reason == "prefill overloaded" and d.ttft_s == pytest.approx(queue_s + 0.2, abs=0.01)
        waits.append(live.retry_after_s(d))
    assert waits == [1, 4, 9]  # the queue less 0.3 s, rounded up to whole seconds


def test_every_policy_rejects_when_no_decode_instance_has_kv_room():
    for admission in ("none", "early", "predictive"):
        conductor, _ = cluster(admission=admission)
        conductor.decode[0].reserved_tokens = 980
        d = conductor.schedule(request(), now=0.0)
        assert not d.admitted and d.reason == "no KV room"


def test_baseline_rejects_on_prefill_load_and_wastes_prefill_when_decode_refuses():
    conductor, _ = cluster(admission="baseline", ttft_slo_s=0.1, tbt_slo_s=0.05)
    conductor.prefill[0].busy_until_s = conductor.prefill[1].busy_until_s = 0.2
    assert conductor.schedule(request(), now=0.0).reason == "prefill overloaded"
    conductor.prefill[0].busy_until_s = conductor.prefill[1].busy_until_s = 0.0
    conductor.decode[0].context_tokens = 50_000  # step 60 ms > TBT SLO 50 ms: decode overloaded
    req = request()
    d = conductor.schedule(req, now=0.0)
    assert d.admitted and d.decode_id is None  # the decode side is asked only after prefill
    assert conductor.on_prefill_done(req, d, now=0.032) is None  # refused: that prefill was wasted
    conductor.decode[0].context_tokens = 0
    d = conductor.schedule(request(1), now=0.0)
    assert conductor.on_prefill_done(request(1), d, now=0.1) == 0


def test_early_rejection_judges_the_decode_side_before_prefill():
    conductor, _ = cluster(admission="early", tbt_slo_s=0.05)
    conductor.decode[0].context_tokens = 50_000
    d = conductor.schedule(request(), now=0.0)
    assert not d.admitted and d.reason == "decode overloaded"
    conductor.decode[0].context_tokens = 0
    assert conductor.schedule(request(1), now=0.0).admitted


def predictive_cluster(admission):
    """One decode instance running request 100 (45,000 context tokens, joined at 0 s) with
    request 101 (45,000 tokens) assigned, its prefill ending at 5 s; decodes last 2 s."""
    conductor, _ = cluster(admission=admission, tbt_slo_s=0.05)
    state = conductor.decode[0]
    state.kv_capacity_tokens = 10**6
    state.members[100] = DecodeMember(join_s=0.0, prompt_len=45_000, reserved_tokens=45_010)
    state.members[101] = DecodeMember(join_s=5.0, prompt_len=45_000, reserved_tokens=45_010)
    state.reserved_tokens, state.batch_size, state.context_tokens = 90_020, 1, 45_000
    conductor.avg_decode_s = 2.0
    return conductor


def test_predictive_admits_what_early_rejects_when_the_decode_batch_will_have_drained():
    req = Request(0, 2000, 10, [])  # prefill 2 s: joins at 2 s, when request 100 has ended
    early, predictive = predictive_cluster("early"), predictive_cluster("predictive")
    assert early.schedule(req, now=0.0).reason == "decode overloaded"  # stale: 45,000 tokens now
    assert predictive.schedule(req, now=0.0).admitted


def test_predictive_rejects_what_early_admits_when_assigned_requests_will_have_joined():
    req = Request(0, 6000, 10, [])  # prefill 6 s: joins at 6 s, while request 101 decodes
    early, predictive = predictive_cluster("early"), predictive_cluster("predictive")
    for conductor in (early, predictive):  # request 100 just finished
        del conductor.decode[0].members[100]
        conductor.decode[0].batch_size = conductor.decode[0].context_tokens = 0
    assert early.schedule(req, now=0.0).admitted
    assert predictive.schedule(req, now=0.0).reason == "decode overloaded"


def test_predictive_keeps_a_request_that_outlived_the_mean_decode_duration():
    req = Request(0, 2000, 10, [])
    predictive = predictive_cluster("predictive")
    predictive.decode[0].members[100].join_s = -10.0  # running for 10 s, mean is 2 s: still there
    assert predictive.schedule(req, now=0.0).reason == "decode overloaded"


def test_finishing_releases_kv_room_and_teaches_the_decode_duration():
    conductor, _ = cluster()
    req = request(new_tokens=10)
    d = conductor.schedule(req, now=0.0)
    conductor.on_decode_join(req.request_id, d.decode_id, now=1.0)
    conductor.on_finish(req.request_id, d.decode_id, now=4.0)
    assert conductor.decode[0].reserved_tokens == 0 and not conductor.decode[0].members
    assert conductor.avg_decode_s == pytest.approx(3.0)


def test_unknown_scheduler_or_admission_is_named():
    with pytest.raises(ValueError, match="'fastest'"):
        ConductorConfig(scheduler="fastest")
    with pytest.raises(ValueError, match="'always'"):
        ConductorConfig(admission="always")
