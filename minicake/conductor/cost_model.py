"""Cost model of the Conductor and the simulator (docs/design.md, Cost models).

Predicts the prefill time of a prompt of N tokens of which C are cached, the decode step
time of a batch (batch size, total context tokens), and the time to move KV blocks between
instances. Every profile has the same polynomial form, so the analytic `paper-70b` profile
and a profile fitted by least squares to measured timings (a JSON file written by
`benchmarks/fit_cost_model.py`) are one class. `gpu_profile` is analytic the same way for a given model on
a given GPU, from the GPU's datasheet. A fitted profile also says how much decode
steps of one shape vary (`decode_step_cv`), which the paper's TBT, the slowest 10% of a
request's gaps, feels. `calibrate` rescales a profile to a few timings measured on the machine
that serves (the live cluster checks its profile so at start-up).
"""
import json
import logging
import math
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from minicake.model.config import ModelConfig
from minicake.platforms.devices import gpu_spec

# prefill(N, C) = sum coef * N^i * C^j. The paper's FLOP count with n = N - C tokens computed,
# attending over all N tokens: l * (4 * n * N * d + 22 * n * d^2) = l*(4d*(N^2 - N*C) + 22d^2*(N - C)),
# so the terms 1, N, C, N^2, N*C hold it exactly (the constant holds fixed per-call overhead).
PREFILL_TERMS = ((0, 0), (1, 0), (0, 1), (2, 0), (1, 1))
# decode_step(B, T) = c0 + c1 * B + c2 * T for B running requests holding T context tokens.
DECODE_TERMS = ((0, 0), (1, 0), (0, 1))

# The paper's setting: a dense 70B model (Llama-2-70B shape) on nodes of 8 A800 GPUs.
LAYERS, HIDDEN, KV_HEADS, HEAD_DIM = 80, 8192, 8, 128
PARAMS = 70e9
KV_BYTES_PER_TOKEN = 2 * LAYERS * KV_HEADS * HEAD_DIM * 2  # K and V, bf16: 327,680 B = 320 KiB
GPUS_PER_NODE, GPU_MEMORY = 8, 80 * 2**30
PEAK_FLOPS = 312e12    # dense bf16 per A800
HBM_BYTES_S = 2.0e12   # per A800
PREFILL_MFU = 0.5      # assumed model-FLOPs utilisation of prefill
DECODE_HBM_UTIL = 0.6  # assumed share of HBM bandwidth that decode reads achieve
LINK_BYTES_S = min(128e9, 800e9 / 8)  # host-to-device 128 GB/s vs 800 Gbps network: 100 GB/s
KV_MEMORY_SHARE = 0.9  # share of GPU memory usable for weights + KV (the rest: activations)
# Between two GPUs of one host (gpu_profile): PCIe 4.0 x16's 32 GB/s less protocol overhead, assumed,
# not measured; NVLink is faster. The start-up calibration rescales compute, not this.
GPU_LINK_BYTES_S = 25e9
CPU_PROFILE = str(Path(__file__).parent / "profiles" / "smollm2-135m-cpu.json")  # the bundled model, fitted here
log = logging.getLogger("minicake")


@dataclass(frozen=True)
class CostModel:
    """A profile: seconds predicted by polynomials, and the KV room of one decode instance."""
    name: str
    prefill_coef: tuple[float, ...]   # over PREFILL_TERMS in (prompt tokens, cached tokens)
    decode_coef: tuple[float, ...]    # over DECODE_TERMS in (batch size, context tokens)
    transfer_s_per_block: float       # moving one KV block of `block_size` tokens
    block_size: int                   # tokens per block that transfer_s_per_block refers to
    kv_capacity_tokens: int           # KV tokens one decode instance can hold
    decode_step_cv: float = 0.0       # std / mean of measured steps of one shape; 0: all take their mean

    def __post_init__(self):
        assert len(self.prefill_coef) == len(PREFILL_TERMS), f"{self.name}: prefill needs {len(PREFILL_TERMS)} coefficients"
        assert len(self.decode_coef) == len(DECODE_TERMS), f"{self.name}: decode needs {len(DECODE_TERMS)} coefficients"
        assert self.block_size > 0 and self.kv_capacity_tokens > 0, f"{self.name}: block_size and KV capacity must be > 0"
        assert 0.0 <= self.decode_step_cv < 1.0, f"{self.name}: decode_step_cv must be in [0, 1), got {self.decode_step_cv}"

    def prefill_time(self, num_tokens: int, num_cached: int) -> float:
        """Seconds to prefill `num_tokens` of which the first `num_cached` are already cached."""
        assert 0 <= num_cached < num_tokens, f"cached {num_cached} must be < prompt {num_tokens}: the last token is always computed"
        c = self.prefill_coef
        n, k = num_tokens, num_cached
        return max(0.0, c[0] + c[1] * n + c[2] * k + c[3] * n * n + c[4] * n * k)

    def decode_step_time(self, batch_size: int, context_tokens: int) -> float:
        """Seconds of one decode step for `batch_size` requests holding `context_tokens` in all."""
        c = self.decode_coef
        return max(0.0, c[0] + c[1] * batch_size + c[2] * context_tokens)

    def transfer_time(self, num_tokens: int) -> float:
        """Seconds to move the KV of `num_tokens` tokens from one instance to another."""
        return self.transfer_s_per_block * num_tokens / self.block_size

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


def paper_70b() -> CostModel:
    """The analytic profile of the paper's setting; every constant is stated above."""
    flops_s = GPUS_PER_NODE * PEAK_FLOPS * PREFILL_MFU
    a = LAYERS * 4 * HIDDEN / flops_s          # attention: 4 * n * N * d per layer
    b = LAYERS * 22 * HIDDEN**2 / flops_s      # linear layers: 22 * n * d^2 per layer
    hbm = GPUS_PER_NODE * HBM_BYTES_S * DECODE_HBM_UTIL
    weight_bytes = 2 * PARAMS
    kv_room = GPUS_PER_NODE * GPU_MEMORY * KV_MEMORY_SHARE - weight_bytes
    return CostModel(
        name="paper-70b",
        prefill_coef=(0.0, b, -b, a, -a),
        decode_coef=(weight_bytes / hbm, 0.0, KV_BYTES_PER_TOKEN / hbm),
        transfer_s_per_block=512 * KV_BYTES_PER_TOKEN / LINK_BYTES_S,
        block_size=512,
        kv_capacity_tokens=int(kv_room // KV_BYTES_PER_TOKEN),
    )


def gpu_profile(gpu_name: str, gpu_memory_bytes: int, model: ModelConfig) -> CostModel:
    """The analytic profile of `model` in bf16 on one GPU named `gpu_name` (a name `gpu_spec` knows),
    as paper_70b's: prefill is FLOP-bound at PREFILL_MFU of the peak (each new token through every
    matmul and attending over all N tokens, plus one row of logits), a decode step reads the weights
    and every context token's K/V at DECODE_HBM_UTIL of the bandwidth. Small models are launch-bound
    instead: the start-up calibration rescales the profile to what the GPU really does."""
    spec = gpu_spec(gpu_name)
    if spec is None:
        raise ValueError(f"GPU {gpu_name!r} is not in minicake/platforms/devices.py's GPU_SPECS")
    m, layers = model, model.num_hidden_layers
    q_width, kv_width = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
    layer_params = m.hidden_size * (2 * q_width + 2 * kv_width + 3 * m.intermediate_size)  # q, o, k, v, MLP
    head_params = m.vocab_size * m.hidden_size  # the LM head; the embedding too, unless tied
    flops_s = spec.bf16_flops * PREFILL_MFU
    linear = layers * 2 * layer_params / flops_s  # seconds per new token
    attention = layers * 4 * q_width / flops_s  # seconds per (new token, attended token)
    hbm = spec.hbm_bytes_s * DECODE_HBM_UTIL
    kv_bytes_per_token = 2 * layers * kv_width * 2  # K and V, bf16
    weight_bytes = 2 * (layers * layer_params + head_params * (1 if m.tie_word_embeddings else 2))
    return CostModel(
        name=f"{m.architecture}-{layers}l-{m.hidden_size}h on {gpu_name}",
        prefill_coef=(2 * head_params / flops_s, linear, -linear, attention, -attention),
        decode_coef=(2 * (layers * layer_params + head_params) / hbm, 0.0, kv_bytes_per_token / hbm),
        transfer_s_per_block=16 * kv_bytes_per_token / GPU_LINK_BYTES_S,
        block_size=16,
        kv_capacity_tokens=max(1, int((gpu_memory_bytes * KV_MEMORY_SHARE - weight_bytes) // kv_bytes_per_token)),
    )


def default_profile(device: str, model: ModelConfig) -> CostModel:
    """The profile a live cluster starts from before its start-up calibration: on a GPU that
    `gpu_spec` knows, `gpu_profile` of `model` there; else the bundled model's CPU fit."""
    if device.startswith("cuda"):
        import torch
        name = torch.cuda.get_device_name(device)
        if gpu_spec(name):
            return gpu_profile(name, torch.cuda.get_device_properties(device).total_memory, model)
        log.warning("GPU %r has no datasheet entry (minicake/platforms/devices.py): the Conductor starts "
                    "from the CPU profile, rescaled by the start-up timings", name)
    return load_profile(CPU_PROFILE)


def load_profile(name_or_path: str) -> CostModel:
    """`paper-70b`, or the path of a JSON profile; raises ValueError naming what is wrong."""
    if name_or_path == "paper-70b":
        return paper_70b()
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"profile {name_or_path!r} is neither 'paper-70b' nor an existing JSON file")
    try:
        d = json.loads(path.read_text())
        model = CostModel(name=str(d["name"]), prefill_coef=tuple(map(float, d["prefill_coef"])),
                          decode_coef=tuple(map(float, d["decode_coef"])),
                          transfer_s_per_block=float(d["transfer_s_per_block"]),
                          block_size=int(d["block_size"]), kv_capacity_tokens=int(d["kv_capacity_tokens"]),
                          decode_step_cv=float(d.get("decode_step_cv", 0.0)))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"profile {path}: not a valid cost-model JSON ({type(e).__name__}: {e})") from None
    if not all(math.isfinite(x) for x in model.prefill_coef + model.decode_coef):
        raise ValueError(f"profile {path}: coefficients must be finite numbers")
    return model


def fit_profile(name: str, prefill_samples: list[tuple[int, int, float]],
                decode_samples: list[tuple[int, int, float]], transfer_s_per_block: float,
                block_size: int, kv_capacity_tokens: int, decode_step_cv: float = 0.0) -> CostModel:
    """Least-squares fit of the polynomials to measured timings.

    prefill_samples: (prompt tokens, cached tokens, seconds); decode_samples: (batch size,
    context tokens, seconds of one step).
    """
    import numpy as np

    def lstsq(samples, terms, what):
        assert len(samples) >= len(terms), f"{what}: need at least {len(terms)} samples, got {len(samples)}"
        x = np.array([[float(a) ** i * float(b) ** j for i, j in terms] for a, b, _ in samples])
        y = np.array([t for _, _, t in samples])
        scale = np.abs(x).max(axis=0)  # columns span 1 .. N^2: scale them for a stable solve
        scale[scale == 0] = 1.0
        coef, *_ = np.linalg.lstsq(x / scale, y, rcond=None)
        return tuple(float(c) for c in coef / scale)

    return CostModel(name=name, prefill_coef=lstsq(prefill_samples, PREFILL_TERMS, "prefill"),
                     decode_coef=lstsq(decode_samples, DECODE_TERMS, "decode"),
                     transfer_s_per_block=transfer_s_per_block, block_size=block_size,
                     kv_capacity_tokens=kv_capacity_tokens, decode_step_cv=decode_step_cv)


def calibrate(profile: CostModel, prefill_samples: list[tuple[int, int, float]],
              decode_samples: list[tuple[int, int, float]]) -> tuple[CostModel, str]:
    """The profile rescaled to timings measured on this machine, and a line saying by how much.

    Samples as for `fit_profile`. The prefill coefficients are multiplied by the median over the
    prefill samples of measured / predicted seconds (a median: one timing that a burst of other
    work slowed does not move it), the decode coefficients likewise: the profile keeps its shape
    and takes the machine's speed. A side without samples keeps its coefficients.
    """
    prefill_f, prefill_line = _factor("prefill (prompt, cached tokens)", prefill_samples, profile.prefill_time)
    decode_f, decode_line = _factor("decode step (batch, context tokens)", decode_samples, profile.decode_step_time)
    scaled = replace(profile, prefill_coef=tuple(c * prefill_f for c in profile.prefill_coef),
                     decode_coef=tuple(c * decode_f for c in profile.decode_coef))
    return scaled, f"{prefill_line}; {decode_line}"


def _factor(what: str, samples: list[tuple[int, int, float]], predict) -> tuple[float, str]:
    """The median of measured / predicted over the samples, and the figures."""
    if not samples:
        return 1.0, f"{what}: not measured, kept"
    if any(predict(a, b) <= 0 for a, b, _ in samples):
        return 1.0, f"{what}: the profile predicts 0 s for a measured shape, kept"
    factor = statistics.median(s / predict(a, b) for a, b, s in samples)
    timings = ", ".join(f"({a}, {b}) {s:.3g}/{predict(a, b):.3g} s" for a, b, s in samples)
    return factor, f"{what} {timings} measured/predicted: median x{factor:.2f}"
