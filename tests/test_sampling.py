import pytest
import torch

from minicake.engine import check_request
from minicake.sampling import (INT64_MAX, INT64_MIN, MAX_STOP_CHARS, MAX_STOP_STRINGS,
                               SamplingParams, sample)


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"seed": "x"}, "seed"),
    ({"n": 0}, "n"),
    ({"n": 2}, "n"),  # one completion per request: refused clearly
    # beyond what the sampler can hold: torch overflows on ints past int64, NaN/inf scale nothing
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": 10**400}, "temperature"),  # an int past the largest float
    ({"temperature": True}, "temperature"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_k": 2**63}, "top_k"),
    ({"max_tokens": 2**63}, "max_tokens"),
    ({"seed": 2**63}, "seed"),
    ({"seed": -2**63 - 1}, "seed"),
    ({"stop_token_ids": [2**64]}, "stop_token_ids"),
    ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop"),
    ({"stop": "x" * (MAX_STOP_CHARS + 1)}, "stop"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
])
def test_bad_sampling_params_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=rf"^(SamplingParams\.)?{name}\b"):
        SamplingParams(**kwargs)


def test_an_error_quotes_a_long_value_shortened():
    with pytest.raises(ValueError) as e:
        SamplingParams(stop=["x" * MAX_STOP_CHARS] * 1000)
    assert len(str(e.value)) < 400  # not the 256,000 characters it was given


@pytest.mark.parametrize("seed", [INT64_MIN, INT64_MAX])
def test_every_int64_seed_is_accepted_and_seeds_a_generator(seed):
    torch.Generator().manual_seed(SamplingParams(seed=seed).seed)


def test_a_temperature_too_small_to_divide_by_is_greedy():
    logits = torch.randn(3, 50) * 10
    params = [SamplingParams(temperature=1e-40)] * 3  # 1e-40 is a float32 denormal: x / T overflows
    tokens = sample(logits, params, [None] * 3, torch.Generator())
    assert tokens == logits.argmax(-1).tolist()


def test_a_huge_temperature_samples_uniformly_without_nan():
    logits = torch.tensor([[0.0, 5.0, 10.0, 20.0]])
    gen = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=1e308, top_p=0.9)]  # 1e308 is inf in float32
    seen = {sample(logits, params, [None], gen)[0] for _ in range(200)}
    assert seen == {0, 1, 2, 3}


def test_stop_accepts_one_string():
    assert SamplingParams(stop="\n").stop == ["\n"]


def test_temperature_zero_is_argmax():
    logits = torch.randn(3, 50)
    tokens = sample(logits, [SamplingParams(temperature=0)] * 3, [None] * 3, torch.Generator())
    assert tokens == logits.argmax(-1).tolist()


def test_a_seeded_request_samples_the_same_tokens_in_any_batch():
    logits = torch.randn(4, 100)
    seeded = SamplingParams(temperature=1.0, seed=7)

    def run(rows):
        gens = [torch.Generator().manual_seed(7) if r == 0 else None for r in rows]
        params = [seeded if r == 0 else SamplingParams(temperature=0.8) for r in rows]
        default = torch.Generator().manual_seed(123)
        out = []
        for _ in range(5):  # five steps of the same logits
            toks = sample(logits[rows], params, gens, default)
            out.append(toks[rows.index(0)])
        return out

    assert run([0]) == run([2, 0, 1]) == run([1, 3, 0])


def test_top_k_samples_only_among_the_k_most_likely():
    logits = torch.randn(1, 100)
    allowed = set(logits[0].topk(3).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=5.0, top_k=3)]
    seen = {sample(logits, params, [None], gen)[0] for _ in range(200)}
    assert seen == allowed


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    gen = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=1.0, top_p=0.7)]  # 0.5 < 0.7: needs the 0.3 too
    seen = {sample(probs.log(), params, [None], gen)[0] for _ in range(200)}
    assert seen == {0, 1}


def test_sampling_follows_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample(logits, [SamplingParams()], [None], gen)[0]] += 1
    assert torch.allclose(counts / 3000, logits.softmax(-1)[0], atol=0.03)


def test_check_request_refuses_top_k_beyond_the_vocabulary_by_name():
    limits = {"vocab_size": 50, "max_model_len": 16, "block_size": 4, "num_blocks": 8}
    with pytest.raises(ValueError, match="top_k=51 is more than the vocabulary size 50"):
        check_request("r", [1, 2], SamplingParams(top_k=51), **limits)
    check_request("r", [1, 2], SamplingParams(top_k=50), **limits)  # the whole vocabulary
