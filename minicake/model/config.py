"""Model hyperparameters, read once from a Hugging Face `config.json`.

One frozen dataclass describes every decoder minicake serves (DESIGN.md section 3: the
Llama family). The three architectures differ only in flags: Qwen2 has q/k/v biases,
Qwen3 normalizes q and k per head. Both config spellings are read: `rope_theta` +
`rope_scaling` (most checkpoints) and `rope_parameters` (transformers >= 5).
"""
import json
from dataclasses import dataclass
from pathlib import Path

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


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
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: a model directory needs a config.json")
        raw = json.loads(config_file.read_text())
        archs = raw.get("architectures") or [f"<no 'architectures' in {config_file}>"]
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r} in {config_file}; "
                             f"minicake serves {', '.join(ARCHITECTURES)}")
        try:
            return cls._from_raw(raw, arch, path)
        except KeyError as e:
            raise ValueError(f"{config_file} lacks the field {e.args[0]!r}") from None

    @classmethod
    def _from_raw(cls, raw: dict, arch: str, path: Path) -> "ModelConfig":
        rope = raw.get("rope_parameters") or dict(raw.get("rope_scaling") or {})
        rope_theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"unsupported rope_type {rope_type!r} in {path / 'config.json'}; "
                             "minicake implements 'default' and 'llama3'")
        if raw.get("mlp_bias") or raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path / 'config.json'}: minicake implements the SiLU MLP without bias")
        if raw.get("use_sliding_window"):
            raise ValueError(f"{path / 'config.json'}: sliding-window attention is not implemented")
        num_heads = raw["num_attention_heads"]
        return cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            rms_norm_eps=float(raw["rms_norm_eps"]),
            rope_theta=rope_theta,
            rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"} if rope_type == "llama3" else None,
            max_position_embeddings=raw["max_position_embeddings"],
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # Qwen2's config has no flag: its q/k/v projections always carry a bias
            attention_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            eos_token_ids=frozenset(_eos_ids(raw, path)),
        )


def _eos_ids(raw: dict, path: Path) -> set[int]:
    """EOS ids from config.json and generation_config.json (which often lists more)."""
    ids = set()
    sources = [raw]
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        sources.append(json.loads(gen_file.read_text()))
    for source in sources:
        eos = source.get("eos_token_id")
        if eos is not None:
            ids.update(eos if isinstance(eos, list) else [eos])
    return ids
