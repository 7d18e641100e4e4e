"""Model hyperparameters, read once from a Hugging Face `config.json`.

One frozen dataclass describes every decoder minicake serves (the Llama family:
docs/design.md, Models and the bundled model). The three architectures differ only in flags:
Qwen2 has q/k/v biases, Qwen3 normalizes q and k per head. Both config spellings are read: `rope_theta` +
`rope_scaling` (most checkpoints) and `rope_parameters` (transformers >= 5).
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
LLAMA3_ROPE_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # the "llama3" parameters, or None for plain RoPE
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    eos_token_ids: frozenset[int]

    def __post_init__(self):
        assert self.num_attention_heads % self.num_key_value_heads == 0, \
            f"{self.num_attention_heads} query heads do not split into {self.num_key_value_heads} KV groups"

    @classmethod
    def from_dir(cls, path) -> "ModelConfig":
        """The config of the model directory `path`; an error naming config.json (or
        generation_config.json) and what is wrong with it if it is missing or invalid."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: a model directory needs a config.json")
        raw = read_json(config_file)
        archs = raw.get("architectures")
        arch = archs[0] if isinstance(archs, list) and archs else f"<no 'architectures' list in {config_file}>"
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r} in {config_file}; "
                             f"minicake serves {', '.join(ARCHITECTURES)}")
        return cls._from_raw(raw, arch, path)

    @classmethod
    def _from_raw(cls, raw: dict, arch: str, path: Path) -> "ModelConfig":
        file = path / "config.json"
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{file}: 'rope_parameters' or 'rope_scaling' must be an object, got {rope!r}")
        rope_theta = _positive(rope if "rope_theta" in rope else raw, "rope_theta", file, float, 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"unsupported rope_type {rope_type!r} in {file}; "
                             "minicake implements 'default' and 'llama3'")
        if rope_type == "llama3":
            for name in LLAMA3_ROPE_FIELDS:
                _positive(rope, name, file, float)
        if raw.get("mlp_bias") or raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{file}: minicake implements the SiLU MLP without bias")
        if raw.get("use_sliding_window"):
            raise ValueError(f"{file}: sliding-window attention is not implemented")
        hidden_size, num_heads = _positive(raw, "hidden_size", file), _positive(raw, "num_attention_heads", file)
        num_kv_heads = _positive(raw, "num_key_value_heads", file, default=num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"{file}: {num_heads} attention heads do not split into {num_kv_heads} KV heads")
        return cls(
            architecture=arch,
            vocab_size=_positive(raw, "vocab_size", file),
            hidden_size=hidden_size,
            intermediate_size=_positive(raw, "intermediate_size", file),
            num_hidden_layers=_positive(raw, "num_hidden_layers", file),
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=_positive(raw, "head_dim", file, default=hidden_size // num_heads),
            rms_norm_eps=_positive(raw, "rms_norm_eps", file, float),
            rope_theta=rope_theta,
            rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"} if rope_type == "llama3" else None,
            max_position_embeddings=_positive(raw, "max_position_embeddings", file),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2's config has no flag: its q/k/v projections always carry a bias
            attention_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            eos_token_ids=frozenset(_eos_ids(raw, path)),
        )


def read_json(file: Path) -> dict:
    """The JSON object in `file`, or ValueError naming the file and what is wrong with it."""
    try:
        value = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _positive(raw: dict, name: str, file: Path, kind: type = int, default=None) -> int | float:
    """raw[name] (`default` where absent or null) as a positive finite `kind`."""
    value = raw.get(name)
    if value is None and default is None:
        raise ValueError(f"{file} lacks the field {name!r}")
    value = default if value is None else value
    kinds = (int, float) if kind is float else int
    if isinstance(value, bool) or not isinstance(value, kinds) or not 0 < value < math.inf:
        raise ValueError(f"{file}: {name!r} must be a positive {'number' if kind is float else 'integer'}, "
                         f"got {value!r}")
    return kind(value)


def _eos_ids(raw: dict, path: Path) -> set[int]:
    """EOS ids from config.json and generation_config.json (which often lists more)."""
    ids = set()
    sources = [(raw, path / "config.json")]
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        sources.append((read_json(gen_file), gen_file))
    for source, file in sources:
        eos = source.get("eos_token_id")
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
            raise ValueError(f"{file}: 'eos_token_id' must be a token id or a list of them, got {eos!r}")
        ids.update(eos)
    return ids
