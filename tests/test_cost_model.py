"""The cost model: the paper-70b profile and the GPU profile against their FLOP and byte counts
written out by hand, and the least-squares fit against a known polynomial (docs/design.md, Cost models)."""
import json

import pytest

from minicake.conductor.cost_model import (CPU_PROFILE, CostModel, calibrate, default_profile, fit_profile,
                                           gpu_profile, load_profile, paper_70b)
from minicake.model.config import ModelConfig

L, D = 80, 8192
NODE_FLOPS = 8 * 312e12 * 0.5  # 8 A800 at the assumed 50% MFU
NODE_HBM = 8 * 2.0e12 * 0.6    # at the assumed 60% of HBM bandwidth
KV_PER_TOKEN = 320 * 1024


def test_paper_70b_prefill_is_the_papers_flop_count():
    n = 8000
    flops = L * (4 * n**2 * D + 22 * n * D**2)
    assert paper_70b().prefill_time(n, 0) == pytest.approx(flops / NODE_FLOPS)


def test_cached_tokens_are_skipped_but_still_attended_to():
    n, cached = 8000, 6000
    new = n - cached
    flops = L * (4 * new * n * D + 22 * new * D**2)  # 2,000 queries attend over all 8,000 keys
    m = paper_70b()
    assert m.prefill_time(n, cached) == pytest.approx(flops / NODE_FLOPS)
    assert m.prefill_time(new, 0) < m.prefill_time(n, cached) < m.prefill_time(n, 0)


def test_paper_70b_decode_step_reads_weights_and_kv_over_hbm():
    m = paper_70b()
    assert m.decode_step_time(16, 200_000) == pytest.approx((140e9 + 200_000 * KV_PER_TOKEN) / NODE_HBM)
    assert m.kv_capacity_tokens == int((8 * 80 * 2**30 * 0.9 - 140e9) // KV_PER_TOKEN)


def test_paper_70b_moves_a_block_at_100_gb_per_s():
    assert paper_70b().transfer_time(512 * 10) == pytest.approx(10 * 512 * KV_PER_TOKEN / 100e9)


def test_fit_recovers_a_known_polynomial():
    truth = CostModel("truth", prefill_coef=(0.02, 3e-4, -2e-4, 1e-8, -1e-8), decode_coef=(0.01, 2e-4, 5e-7),
                      transfer_s_per_block=1e-3, block_size=16, kv_capacity_tokens=4096)
    prefill = [(n, c, truth.prefill_time(n, c)) for n in (64, 256, 512, 1024, 2048) for c in (0, 32, n // 2)]
    decode = [(b, t, truth.decode_step_time(b, t)) for b in (1, 4, 16) for t in (100, 1000, 4000)]
    fitted = fit_profile("fitted", prefill, decode, 1e-3, 16, 4096)
    for n, c, t in prefill:
        assert fitted.prefill_time(n, c) == pytest.approx(t, rel=1e-6)
    for b, k, t in decode:
        assert fitted.decode_step_time(b, k) == pytest.approx(t, rel=1e-6)


def test_calibration_rescales_a_profile_twice_too_slow_to_the_measured_times():
    machine = CostModel("this machine", prefill_coef=(0.016, 1e-3, -1e-3, 3e-7, -3e-7), decode_coef=(0.01, 5e-4, 1e-6),
                        transfer_s_per_block=1e-3, block_size=16, kv_capacity_tokens=4096)
    fitted_elsewhere = CostModel("fitted elsewhere", tuple(2 * c for c in machine.prefill_coef),
                                 tuple(2 * c for c in machine.decode_coef), 1e-3, 16, 4096)
    noise = (1.02, 0.98, 1.01, 3.0, 0.99)  # a few % off their mean, and one slowed by a burst of other work
    prefill = [(n, 0, machine.prefill_time(n, 0) * e) for n, e in zip((64, 192, 64, 192, 64), noise)]
    decode = [(1, t, machine.decode_step_time(1, t) * e) for t, e in zip(range(67, 72), noise)]
    calibrated, line = calibrate(fitted_elsewhere, prefill, decode)
    assert calibrated.prefill_time(1000, 0) == pytest.approx(machine.prefill_time(1000, 0), rel=0.03)
    assert calibrated.decode_step_time(8, 4000) == pytest.approx(machine.decode_step_time(8, 4000), rel=0.03)
    assert line.startswith("prefill (prompt, cached tokens) (64, 0) 0.0829/0.162 s,") and line.count("median x0.5") == 2
    assert calibrate(fitted_elsewhere, prefill, [])[0].decode_coef == fitted_elsewhere.decode_coef  # not measured: kept


def test_a_saved_profile_loads_back(tmp_path):
    path = tmp_path / "profile.json"
    paper_70b().save(path)
    assert load_profile(str(path)) == paper_70b()


def test_a_profile_without_a_decode_step_spread_loads_with_none(tmp_path):
    path = tmp_path / "spread.json"
    spread = CostModel("spread", (0.0,) * 5, (0.03, 0.005, 0.0), 1e-3, 16, 4096, decode_step_cv=0.07)
    spread.save(path)
    assert load_profile(str(path)) == spread
    older = json.loads(path.read_text())
    del older["decode_step_cv"]  # fitted before the spread was measured
    path.write_text(json.dumps(older))
    assert load_profile(str(path)).decode_step_cv == 0.0


def test_a_bad_profile_is_named(tmp_path):
    with pytest.raises(ValueError, match="nope.json"):
        load_profile(str(tmp_path / "nope.json"))
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"name": "x", "prefill_coef": [1.0]}))
    with pytest.raises(ValueError, match="broken.json"):
        load_profile(str(path))


# SmolLM2-135M's shape: 30 layers, hidden 576, 9 query / 3 KV heads of 64, MLP 1536, 49,152 tokens, tied
SMOLLM2 = ModelConfig("LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                      rms_norm_eps=1e-5, rope_theta=1e5, rope_scaling=None, max_position_embeddings=8192,
                      tie_word_embeddings=True, attention_bias=False, qk_norm=False, eos_token_ids=frozenset({2}))
LAYER_PARAMS = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536  # q, o; k, v; gate, up, down: 3,538,944
HEAD_PARAMS = 49152 * 576  # 28,311,552: 134.5 M parameters with the layers
H100_FLOPS, H100_HBM = 989e12 * 0.5, 3.35e12 * 0.6  # datasheet peaks at the assumed MFU and HBM share


def test_gpu_profile_prefill_is_the_models_flop_count_on_the_gpu():
    n = 1000  # each token through 30 layers' matmuls, attending to all 1,000; one row of logits
    flops = 2 * HEAD_PARAMS + 30 * (2 * LAYER_PARAMS * n + 4 * 576 * n * n)
    profile = gpu_profile("NVIDIA H100 80GB HBM3", 80 * 2**30, SMOLLM2)
    assert profile.prefill_time(n, 0) == pytest.approx(flops / H100_FLOPS)  # 0.57 ms
    assert profile.prefill_time(n, 600) == pytest.approx(
        (2 * HEAD_PARAMS + 30 * (2 * LAYER_PARAMS * 400 + 4 * 576 * 400 * n)) / H100_FLOPS)


def test_gpu_profile_decode_step_reads_the_weights_and_the_kv_over_hbm():
    kv_per_token = 2 * 30 * 3 * 64 * 2  # K and V of 30 layers' 3 heads of 64, bf16: 23,040 B
    profile = gpu_profile("NVIDIA H100 80GB HBM3", 80 * 2**30, SMOLLM2)
    weights = 2 * (30 * LAYER_PARAMS + HEAD_PARAMS)  # 269 MB
    assert profile.decode_step_time(8, 4000) == pytest.approx((weights + 4000 * kv_per_token) / H100_HBM)  # 0.18 ms
    assert profile.kv_capacity_tokens == int((80 * 2**30 * 0.9 - weights) // kv_per_token)
    assert profile.transfer_time(16) == pytest.approx(16 * kv_per_token / 25e9)


def test_an_unknown_gpu_is_named_and_the_default_off_a_gpu_is_the_cpu_fit():
    with pytest.raises(ValueError, match="'Some Future GPU' is not in"):
        gpu_profile("Some Future GPU", 2**30, SMOLLM2)
    assert default_profile("cpu", SMOLLM2) == load_profile(CPU_PROFILE)
