import pytest
import torch

from minicake.engine import check_request
from minicake.sampling import (INT64_MAX, INT64_MIN, MAX_STOP_CHARS, MAX_STOP_STRINGS,
                               SamplingParams, exponential_noise, hash_bits, sample)


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


def draws(logits, params, n):
    """n samples of one row of logits, each from another seed."""
    return [sample(logits, params, [seed], [0])[0] for seed in range(n)]


@pytest.mark.parametrize("seed", [INT64_MIN, -1, 0, INT64_MAX])
def test_every_int64_seed_is_accepted_and_keys_the_noise(seed):
    logits = torch.randn(1, 1000)
    params = [SamplingParams(seed=seed)]
    assert sample(logits, params, [seed], [5]) == sample(logits, params, [seed], [5])
    noise = exponential_noise(torch.tensor([seed]), torch.tensor([5]), 1000)
    assert torch.isfinite(noise).all() and (noise > 0).all()


def test_a_temperature_too_small_to_divide_by_is_greedy():
    logits = torch.randn(3, 50) * 10
    params = [SamplingParams(temperature=1e-40)] * 3  # 1e-40 is a float32 denormal: x / T overflows
    tokens = sample(logits, params, [1, 2, 3], [0, 0, 0])
    assert tokens == logits.argmax(-1).tolist()


def test_a_huge_temperature_samples_uniformly_without_nan():
    logits = torch.tensor([[0.0, 5.0, 10.0, 20.0]])
    params = [SamplingParams(temperature=1e308, top_p=0.9)]  # 1e308 is inf in float32
    assert set(draws(logits, params, 200)) == {0, 1, 2, 3}


def test_stop_accepts_one_string():
    assert SamplingParams(stop="\n").stop == ["\n"]


def test_temperature_zero_is_argmax():
    logits = torch.randn(3, 50)
    tokens = sample(logits, [SamplingParams(temperature=0)] * 3, [1, 2, 3], [0, 0, 0])
    assert tokens == logits.argmax(-1).tolist()


def test_greedy_rows_keep_the_argmax_beside_sampled_rows():
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=2.0, top_k=5)] * 2
    tokens = sample(logits, params, [1, 2, 3, 4], [0, 0, 0, 0])
    assert tokens[0::2] == logits[0::2].argmax(-1).tolist()


def test_the_same_seed_and_position_sample_the_same_token_twice():
    logits = torch.randn(3, 1000)
    params = [SamplingParams(temperature=1.0, top_p=0.95)] * 3
    first = sample(logits, params, [7, 8, 9], [10, 10, 11])
    assert first == sample(logits, params, [7, 8, 9], [10, 10, 11])
    assert [sample(logits, params, [7, 8, 9], [p, p, p]) for p in range(20)] != [first] * 20  # positions matter


def test_a_seeded_row_samples_the_same_token_in_any_batch():
    logits = torch.randn(4, 100)
    seeded = SamplingParams(temperature=1.0, seed=7)

    def run(rows):
        params = [seeded if r == 0 else SamplingParams(temperature=0.8) for r in rows]
        seeds = [7 if r == 0 else 100 + r for r in rows]
        return [sample(logits[rows], params, seeds, [pos] * len(rows))[rows.index(0)] for pos in range(5)]

    assert run([0]) == run([2, 0, 1]) == run([1, 3, 0])


def chi_square(bits: torch.Tensor, bins: int = 100) -> float:
    """Of 24-bit values in `bins` equal bins (bins - 1 degrees of freedom)."""
    counts = torch.bincount((bits.flatten() * bins) >> 24, minlength=bins).double()
    expected = bits.numel() / bins
    return ((counts - expected) ** 2 / expected).sum().item()


def test_the_noise_is_uniform_exponential_and_independent():
    # 100 seeds x 1000 positions of one token (neighbouring seeds and positions are the likeliest
    # to correlate), and 10 rows of 10,000 tokens; chi-square < 150 at 99 degrees of freedom: p ~ 0.0006
    seeds, positions = torch.arange(100).repeat_interleave(1000) - 50, torch.arange(1000).repeat(100)
    over_positions = hash_bits(seeds, positions, 1)
    over_tokens = hash_bits(torch.arange(10), torch.zeros(10, dtype=torch.int64), 10_000)
    for bits in (over_positions, over_tokens):
        assert chi_square(bits) < 150
    noise = exponential_noise(seeds, positions, 1)[:, 0]  # Exp(1): mean 1, variance 1
    assert abs(noise.mean().item() - 1) < 0.02 and abs(noise.var().item() - 1) < 0.05
    neighbours = torch.corrcoef(torch.stack([noise[:-1], noise[1:]]))[0, 1].item()
    assert abs(neighbours) < 0.02, f"noise at neighbouring positions correlates: {neighbours:.3f}"


def test_top_k_samples_only_among_the_k_most_likely():
    logits = torch.randn(1, 100)
    allowed = set(logits[0].topk(3).indices.tolist())
    assert set(draws(logits, [SamplingParams(temperature=5.0, top_k=3)], 200)) == allowed


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    params = [SamplingParams(temperature=1.0, top_p=0.7)]  # 0.5 < 0.7: needs the 0.3 too
    assert set(draws(probs.log(), params, 200)) == {0, 1}


def test_sampling_follows_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    counts = torch.bincount(torch.tensor(draws(logits, [SamplingParams()], 3000)), minlength=3)
    assert torch.allclose(counts / 3000, logits.softmax(-1)[0], atol=0.03)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_sampling_equals_cpu_sampling_for_the_same_seeds():
    logits = torch.randn(64, 151_936, generator=torch.Generator().manual_seed(0)) * 3  # Qwen's vocabulary
    params = [SamplingParams(temperature=t, top_k=k, top_p=p)
              for t, k, p in [(0, -1, 1.0), (1.0, -1, 1.0), (0.7, 50, 1.0), (1.2, -1, 0.9)] * 16]
    seeds, positions = list(range(-32, 32)), [3 * i for i in range(64)]
    on_gpu = hash_bits(torch.tensor(seeds, device="cuda"), torch.tensor(positions, device="cuda"), 151_936)
    assert torch.equal(on_gpu.cpu(), hash_bits(torch.tensor(seeds), torch.tensor(positions), 151_936))
    assert sample(logits.cuda(), params, seeds, positions) == sample(logits, params, seeds, positions)


def test_check_request_refuses_top_k_beyond_the_vocabulary_by_name():
    limits = {"vocab_size": 50, "max_model_len": 16, "block_size": 4, "num_blocks": 8}
    with pytest.raises(ValueError, match="top_k=51 is more than the vocabulary size 50"):
        check_request("r", [1, 2], SamplingParams(top_k=51), **limits)
    check_request("r", [1, 2], SamplingParams(top_k=50), **limits)  # the whole vocabulary
