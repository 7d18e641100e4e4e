"""The scheduler alone, with a fake model step: every scheduled token is 'computed' and a
sequence that reached its end gets token 0 appended."""
from minicake.cache.block_manager import BlockManager
from minicake.sampling import SamplingParams
from minicake.sched.scheduler import Scheduler
from minicake.sched.sequence import Sequence, SequenceStatus


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=32):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, max_num_seqs, budget)


def fake_step(sched):
    """One step; returns the scheduled sequences with how many tokens each computed."""
    scheduled = sched.schedule()
    counts = [s.num_scheduled_tokens for s in scheduled]
    for s in sched.advance(scheduled):  # the sequences that reached their end get a token
        s.append_token(0)
    return list(zip(scheduled, counts))


def add(sched, request_id, n):
    """A prompt of n tokens that shares no prefix with the other requests."""
    start = 1000 * (len(sched.waiting) + len(sched.running) + 1)
    s = Sequence(request_id, list(range(start, start + n)), SamplingParams())
    sched.add(s)
    return s


def test_a_long_prompt_is_prefilled_in_chunks_of_the_budget():
    sched = make(budget=32)
    s = add(sched, "a", 80)
    assert [n for _, n in fake_step(sched)] == [32]
    assert [n for _, n in fake_step(sched)] == [32]
    assert [n for _, n in fake_step(sched)] == [16]
    assert len(s) == 81  # the last chunk sampled a token
    assert [n for _, n in fake_step(sched)] == [1]


def test_decodes_are_scheduled_before_a_chunked_prompt():
    sched = make(budget=16)
    a = add(sched, "a", 8)
    fake_step(sched)  # a prefilled
    b = add(sched, "b", 40)
    fake_step(sched)  # a decodes, b gets the remaining 15 tokens
    assert (a.num_computed_tokens, b.num_computed_tokens) == (9, 15)
    assert fake_step(sched)[0][0] is a


def test_max_num_seqs_caps_the_running_batch():
    sched = make(max_num_seqs=2)
    for i in range(3):
        add(sched, f"r{i}", 4)
    assert len(fake_step(sched)) == 2
    assert len(sched.waiting) == 1


def test_out_of_blocks_preempts_the_newest_and_recomputes_it():
    sched = make(num_blocks=4, block_size=4, budget=64)
    a = add(sched, "a", 7)
    b = add(sched, "b", 7)
    fake_step(sched)  # both prefilled: 2 blocks each, cache full
    fake_step(sched)  # a's 8th token fits its block; b too
    assert sched.num_preemptions == 0
    fake_step(sched)  # a needs a third block: b is preempted
    assert sched.num_preemptions == 1
    assert b.status == SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert len(b) == 9  # its output is kept and recomputed as prompt
    assert a.status == SequenceStatus.RUNNING


def test_finish_releases_blocks_and_leaves_no_queue_entry():
    sched = make()
    a = add(sched, "a", 10)
    b = add(sched, "b", 10)
    fake_step(sched)
    sched.finish(a, "stop")
    sched.finish(b, "abort")
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_a_repeated_prompt_is_admitted_with_its_cached_prefix():
    sched = make(block_size=4)
    add(sched, "a", 10)
    fake_step(sched)
    b = Sequence("b", list(range(1000, 1010)), SamplingParams())
    sched.add(b)
    fake_step(sched)
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 10
    assert sched.block_manager.prefix_hits_tokens == 8
    assert sched.block_manager.prefix_queries_tokens == 20
