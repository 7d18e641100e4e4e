"""CUDA graphs for decode steps (platforms/cuda_graph.py). On the CPU, under Triton's interpreter,
everything but the capture: a step padded to its bucket gives the real rows the unpadded step's
logits and stores nothing for the padding, and the engine through the graphs' code path (each
graph replayed as its eager step) gives transformers' greedy tokens. On a GPU: replays equal
eager steps, and after start-up no request compiles a Triton kernel."""
import os

import pytest
import torch
from model_fixtures import hf_greedy
from test_llm import prompts, tiny_llm

from minicake.config import EngineConfig
from minicake.engine import Engine
from minicake.kernels import paged_attention, store_kv
from minicake.platforms.cuda_graph import CudaGraphs, StaticInputs, batch_buckets, logits_of_step
from minicake.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py's default
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                               reason="needs a CUDA GPU and compiled Triton (TRITON_INTERPRET=0, as gpu_check.sh runs)")


def test_batch_buckets_are_powers_of_two_then_multiples_of_8_up_to_max_num_seqs():
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(30) == [1, 2, 4, 8, 16, 24, 30]


def a_decode_step(engine, num_seqs):
    """Prefill num_seqs requests, then schedule their first decode step: (seqs, its inputs)."""
    for i, p in enumerate(prompts()[:num_seqs]):
        engine.add_request(f"r{i}", p, GREEDY)
    engine.step()  # every prompt fits one step
    seqs = engine.scheduler.schedule()
    assert [seq.num_scheduled_tokens for seq in seqs] == [1] * num_seqs
    return seqs, engine.runner.prepare(seqs)


def finish(engine, seqs):
    """Run the scheduled step for real, then the requests to their end."""
    engine._postprocess(seqs, engine.runner.execute(seqs))
    while engine.has_unfinished_requests():
        engine.step()


# padding rows attend to nothing: their attention is 0 / 0, NaN in rows no one reads
@needs_interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")
def test_a_padded_step_gives_the_real_rows_the_unpadded_logits_and_stores_nothing_for_padding(tiny_checkpoint):
    engine = tiny_llm(tiny_checkpoint, kernels="triton").engine
    seqs, (input_ids, positions, meta) = a_decode_step(engine, 3)
    inputs = StaticInputs(8, engine._max_blocks_per_seq(), engine.device)
    inputs.context_lens.fill_(7)  # what a previous, larger step left: padding rows must not keep it
    inputs.slot_mapping.fill_(0)
    k_before = engine.kv_caches[0][0].clone()

    padded = logits_of_step(engine.model, engine.kv_caches, *inputs.fill(4, input_ids, positions, meta))

    assert padded.shape == (4, engine.model_config.vocab_size)
    assert torch.equal(inputs.slot_mapping[3:4], torch.tensor([-1])) and inputs.context_lens[3] == 0
    changed = (engine.kv_caches[0][0] != k_before).flatten(2).any(-1).flatten()  # [num_blocks * block_size]
    assert changed.nonzero().flatten().tolist() == sorted(meta.slot_mapping.tolist())  # the real rows' slots only
    unpadded = logits_of_step(engine.model, engine.kv_caches, input_ids, positions, meta)
    torch.testing.assert_close(padded[:3], unpadded, rtol=0, atol=1e-5)
    finish(engine, seqs)


class EagerReplay:
    """A captured graph's stand-in on the CPU: replay() runs the bucket's step eagerly, over the
    same static buffers, and counts."""

    def __init__(self, graphs: CudaGraphs, bucket: int):
        self.graphs, self.bucket, self.replays = graphs, bucket, 0

    def replay(self):
        self.graphs._step(self.bucket)
        self.replays += 1


@needs_interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")
def test_the_engine_through_the_graphs_code_path_gives_transformers_greedy_tokens(tiny_checkpoint):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama")).eval()
    llm = tiny_llm(tiny_checkpoint, kernels="triton", max_num_seqs=6)
    graphs = CudaGraphs(llm.engine.model, llm.engine.kv_caches, 6, llm.engine._max_blocks_per_seq())
    graphs.graphs = {b: EagerReplay(graphs, b) for b in graphs.buckets}  # buckets 1, 2, 4, 6
    llm.engine.runner.decode_graphs = graphs

    outputs = llm.generate(prompts(), GREEDY)  # every decode step: 5 sequences, padded to 6

    assert {b: g.replays for b, g in graphs.graphs.items()} == {1: 0, 2: 0, 4: 0, 6: GREEDY.max_tokens - 1}
    for p, out in zip(prompts(), outputs):
        assert out.token_ids == hf_greedy(hf, p, GREEDY.max_tokens)


def gpu_engine(tiny_checkpoint, **settings):
    settings = {"block_size": 16, "num_kv_blocks": 256, "max_num_seqs": 16, **settings}
    return Engine(EngineConfig(model=str(tiny_checkpoint("llama")), device="cuda", **settings))


@needs_gpu
def test_graph_replay_equals_the_eager_step_and_changes_no_greedy_token(tiny_checkpoint):
    engine = gpu_engine(tiny_checkpoint, dtype="float32")  # float32: eager and graphed tokens compare exactly
    seqs, (input_ids, positions, meta) = a_decode_step(engine, 3)
    replayed = engine.runner.decode_graphs.run(input_ids, positions, meta).clone()  # the bucket of 4
    eager = logits_of_step(engine.model, engine.kv_caches, input_ids, positions, meta)
    torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
    finish(engine, seqs)
    requests = prompts((3, 17, 40, 9, 26, 100)), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    assert generate(engine, *requests) == generate(gpu_engine(tiny_checkpoint, dtype="float32", enforce_eager=True),
                                                   *requests)


@needs_gpu
def test_after_start_up_no_request_compiles_a_kernel(tiny_checkpoint):
    kernels = (paged_attention._paged_attention_kernel, paged_attention._combine_splits_kernel,
               store_kv._store_kv_kernel)

    def compiled():
        return sum(len(cache[0]) for k in kernels for cache in k.device_caches.values())

    engine = gpu_engine(tiny_checkpoint, max_num_batched_tokens=32)  # bf16; long prompts come in chunks
    after_start_up = compiled()
    generate(engine, prompts((3, 17, 40, 9, 26, 100, 1, 64)), SamplingParams(max_tokens=40, ignore_eos=True))
    assert compiled() == after_start_up


def generate(engine, token_lists, params):
    """Each request's generated tokens, from the engine's own step loop."""
    for i, p in enumerate(token_lists):
        engine.add_request(f"g{i}", p, params)
    tokens = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return [tokens[f"g{i}"] for i in range(len(token_lists))]
