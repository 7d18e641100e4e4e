"""Finding a model and loading its weights: from a name to an eval-mode `CausalLM`.

`resolve_model` turns what a user typed into a local Hugging Face layout directory (a
path, the built-in "smollm2-135m", or a hub id); `load_model` builds the decoder on the
meta device and streams every tensor of the safetensors files straight into it (into its
rows, for the stacked q/k/v and gate/up weights), so a checkpoint never sits in memory twice.
`check_weight_files` finds a truncated or corrupt weights file from the headers alone, for a
server to refuse it in one line before it starts a process. No transformers at run time.
"""
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from minicake.model.bundled import BUNDLED_NAME, bundled_model_dir
from minicake.model.config import ModelConfig, read_json
from minicake.model.llama import CausalLM, StackedLinear


def resolve_model(name_or_path: str) -> Path:
    """A local directory in Hugging Face layout for `name_or_path`."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path == BUNDLED_NAME:
        return bundled_model_dir()
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        return _from_hub(name_or_path)
    raise FileNotFoundError(f"model {name_or_path!r} is neither a local directory, the built-in "
                            f"{BUNDLED_NAME!r}, nor a hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct'")


def _from_hub(repo_id: str) -> Path:
    hint = ("download the checkpoint elsewhere (config.json, *.safetensors, tokenizer.json, "
            "tokenizer_config.json) and pass its local directory instead")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise RuntimeError(f"{repo_id!r} looks like a hub id, but huggingface_hub is not installed: "
                           f"`pip install huggingface_hub`, or {hint}") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise RuntimeError(f"could not fetch {repo_id!r} from the Hugging Face hub "
                           f"({type(e).__name__}: {e}); {hint}") from e


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs; fp32 on CPUs, where bf16 matmuls are slow without bf16 instructions."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(path, device=None, dtype: torch.dtype | None = None) -> CausalLM:
    path = Path(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    config = ModelConfig.from_dir(path)
    with torch.device("meta"):
        model = CausalLM(config).to(dtype)
    model.to_empty(device=device)  # allocate, uninitialized: every parameter is loaded below
    expected = checkpoint_tensors(model)
    loaded = set()
    for file in safetensors_files(path):
        with _safe_open(file, str(device)) as f:
            for name in f.keys():
                if _unused(name, config):
                    continue
                if name not in expected:
                    raise ValueError(f"unexpected tensor {name!r} in {file} for {config.architecture}")
                tensor, target = f.get_tensor(name), expected[name]
                if tensor.shape != target.shape:
                    raise ValueError(f"tensor {name!r} in {file} has shape {tuple(tensor.shape)}, "
                                     f"the model expects {tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(tensor)
                loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise ValueError(f"{len(missing)} tensors missing from the checkpoint in {path}, first: {missing[0]!r}")
    model.eval().requires_grad_(False)
    return model


def check_weight_files(path) -> None:
    """Raise what `load_model(path)` would for a missing, truncated or corrupt safetensors file,
    reading only the files' headers."""
    for file in safetensors_files(Path(path)):
        with _safe_open(file, "cpu"):
            pass


def _safe_open(file: Path, device: str):
    """safe_open, which parses the header and checks that the file holds every tensor it lists."""
    try:
        return safe_open(file, framework="pt", device=device)
    except SafetensorError as e:
        raise ValueError(f"{file}: truncated or not a safetensors file ({e})") from None


def checkpoint_tensors(model: CausalLM) -> dict[str, torch.Tensor]:
    """Every tensor name a checkpoint must hold -> the parameter (or, for the parts of a
    `StackedLinear`, the rows of it) that its values go to."""
    tensors = {}
    for module_name, module in model.named_modules():
        for kind, param in module.named_parameters(recurse=False):  # kind: "weight" or "bias"
            if isinstance(module, StackedLinear):
                parent = module_name.rpartition(".")[0]  # "layers.3.self_attn"
                for part, rows in module.part_rows().items():
                    tensors[_checkpoint_name(f"{parent}.{part}.{kind}")] = param[rows]
            else:
                tensors[_checkpoint_name(f"{module_name}.{kind}")] = param
    return tensors


def _unused(name: str, config: ModelConfig) -> bool:
    """Checkpoint tensors that carry nothing we use."""
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_word_embeddings)


def _checkpoint_name(param_name: str) -> str:
    return param_name if param_name == "lm_head.weight" else "model." + param_name


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's files: those a sharded index names, or the single model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
        shards = sorted(set(weight_map.values()))
        files = [path / shard for shard in shards]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{index} names the shard {file.name}, which is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return files
