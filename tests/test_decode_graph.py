"""Decode graphs (platforms/cpu/decode_graph.py): a small decode step recorded once and replayed gives
the eager step's logits bit for bit; a step that computes anything in torch is not recorded,
and that batch size stays eager."""
import logging

import pytest
import torch
from test_llm import prompts, tiny_llm

from minicake.model import runner as runner_module
from minicake.model.llama import SiluAndMul
from minicake.platforms.cpu import kernels as cpu_kernels
from minicake.platforms.cpu.decode_graph import GRAPH_MAX_BATCH, DecodeGraph, NotRecordable, _OnlyBuffers
from minicake.platforms.cpu.modules import CpuSiluAndMul
from minicake.sampling import SamplingParams

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler here: no decode graphs")


def logits_at_the_sampler(monkeypatch, llm, requests):
    """Generate, and return the logits of every step as the sampler saw them."""
    seen, sample = [], runner_module.sample
    monkeypatch.setattr(runner_module, "sample", lambda logits, *a: seen.append(logits.clone()) or sample(logits, *a))
    outputs = llm.generate(*requests)
    monkeypatch.setattr(runner_module, "sample", sample)
    return seen, outputs


# qwen2: q/k/v biases, added inside the C matmul; qwen3: RMSNorm of each head of q and k, in C on the views
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_replayed_steps_give_the_eager_logits_bit_for_bit(tiny_checkpoint, monkeypatch, arch):
    # greedy and seeded sampling; the batch shrinks from 5 to 2 as requests end (12 new tokens for
    # the first 2, 6 for the rest)
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 2 + \
             [SamplingParams(temperature=0.8, top_p=0.9, seed=s, max_tokens=6, ignore_eos=True) for s in range(3)]
    requests = (prompts(), params)
    eager = tiny_llm(tiny_checkpoint, arch, enforce_eager=True)
    graphed = tiny_llm(tiny_checkpoint, arch)
    eager_logits, eager_out = logits_at_the_sampler(monkeypatch, eager, requests)
    graph_logits, graph_out = logits_at_the_sampler(monkeypatch, graphed, requests)

    assert eager.engine.runner.decode_graphs is None
    graphs = graphed.engine.runner.decode_graphs.graphs
    assert sorted(graphs) == [2, 5] and all(isinstance(g, DecodeGraph) for g in graphs.values())
    assert len(graph_logits) == len(eager_logits)
    for step, (g, e) in enumerate(zip(graph_logits, eager_logits)):
        assert torch.equal(g, e), f"step {step}: replayed logits differ from eager ones"
    assert [o.token_ids for o in graph_out] == [o.token_ids for o in eager_out]


def test_a_step_with_torch_ops_is_not_recorded_and_stays_eager(tiny_checkpoint, caplog, monkeypatch):
    """An activation computed by torch's ops, not C: a replay of C calls would skip it."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    expected = [o.token_ids for o in tiny_llm(tiny_checkpoint, enforce_eager=True).generate(prompts()[:2], params)]
    monkeypatch.setattr(CpuSiluAndMul, "forward", SiluAndMul.forward)
    llm = tiny_llm(tiny_checkpoint)
    with caplog.at_level(logging.INFO, logger="minicake"):
        outputs = llm.generate(prompts()[:2], params)
    assert llm.engine.runner.decode_graphs.graphs == {2: None}
    assert "decode steps of 2 sequences run eagerly" in caplog.text and "computes values" in caplog.text
    assert [o.token_ids for o in outputs] == expected


def test_larger_batches_run_eagerly(tiny_checkpoint):
    llm = tiny_llm(tiny_checkpoint)
    llm.generate(prompts([5] * (GRAPH_MAX_BATCH + 1)), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert llm.engine.runner.decode_graphs.graphs == {}


def test_a_decode_instance_whose_first_step_is_a_decode_records_too(tiny_checkpoint):
    """One-token prompts: the first step already decodes (as on a decode instance, which never
    prefills); RoPE's table is built on first use, by the unrecorded run before the recording."""
    llm = tiny_llm(tiny_checkpoint)
    llm.generate(prompts([1, 1]), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert isinstance(llm.engine.runner.decode_graphs.graphs[2], DecodeGraph)


def test_a_cpu_engine_in_bf16_runs_eagerly(tiny_checkpoint):
    llm = tiny_llm(tiny_checkpoint, dtype="bfloat16")
    outputs = llm.generate(prompts()[:2], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert llm.engine.runner.decode_graphs is None and all(len(o.token_ids) == 3 for o in outputs)


def test_the_recording_guard_passes_allocations_and_views_only():
    x = torch.zeros(4, 6)
    with _OnlyBuffers() as watch:
        view, (left, right), new = x.view(2, 12), x.split_with_sizes([2, 4], dim=1), torch.empty(3)
    assert all(any(t is b for b in watch.buffers) for t in (view, left, right, new)), "kept alive"
    for op, what in [(lambda: x.add_(1), "writes into a tensor"), (lambda: x + 1, "computes values"),
                     (lambda: x.sum().item(), "computes values"), (lambda: x.contiguous().t().contiguous(), "computes")]:
        with pytest.raises(NotRecordable, match=what), _OnlyBuffers():
            op()
