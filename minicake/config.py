"""Engine settings: one dataclass with validated defaults (nano-vllm's `Config`).

Everything a single instance needs to know that is not a model hyperparameter: which model,
where it runs, how big the paged KV cache is, and the scheduler's per-step budgets; and
where minicake keeps what it builds once (the converted bundled model, the CPU kernels).
"""
import os
from dataclasses import dataclass
from pathlib import Path

KERNELS = ("auto", "torch", "triton")  # the platforms of minicake/platforms, by the kernels they run


def cache_dir() -> Path:
    """`$MINICAKE_CACHE`, default `~/.cache/minicake`, created on first use."""
    path = Path(os.environ.get("MINICAKE_CACHE", "~/.cache/minicake")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"
    device: str | None = None  # None: cuda if available, else cpu
    dtype: str | None = None  # None: the model loader's default (fp32 on CPU, bf16 on CUDA)
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes for the KV cache; None: kv_cache_fraction of free memory
    kv_cache_fraction: float = 0.3  # of the memory left once the weights are in; a cluster's CPU instances share it
    num_kv_blocks: int | None = None  # explicit block count, overrides the memory budget
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 1024  # per-step token budget; long prompts prefill in chunks
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    kv_pool_blocks: int = 0  # host-memory KV pool (cache/kv_pool.py) for evicted prefix blocks; 0: none
    kernels: str = "auto"  # the platform (minicake/platforms): "auto", "torch" (the model's own ops), "triton"
    enforce_eager: bool = False  # True: no decode graphs (CUDA graphs on a GPU, the CPU's C-call graphs), every step eager
    num_threads: int | None = None  # torch CPU threads; None: all cores
    seed: int = 0
    # disaggregation (minicake/disagg): a KV transfer silent this long is aborted; layer-wise
    # sends overlap prefill compute, False sends every layer after the prompt (the baseline)
    kv_transfer_timeout: float = 30.0
    kv_transfer_layerwise: bool = True

    def max_model_len_for(self, model_config) -> int:
        """The longest sequence an engine of this model takes: max_model_len, by default the
        model's max_position_embeddings (RoPE has no angles past it, so more is refused)."""
        if (self.max_model_len or 0) > model_config.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} is more than the model's "
                             f"max_position_embeddings {model_config.max_position_embeddings}")
        return self.max_model_len or model_config.max_position_embeddings

    def __post_init__(self):
        _positive("block_size", self.block_size)
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        if not isinstance(self.kv_pool_blocks, int) or self.kv_pool_blocks < 0:
            raise ValueError(f"EngineConfig.kv_pool_blocks must be an integer >= 0, got {self.kv_pool_blocks!r}")
        for name in ("kv_cache_memory", "num_kv_blocks", "max_model_len", "num_threads"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if not isinstance(self.kv_transfer_timeout, (int, float)) or self.kv_transfer_timeout <= 0:
            raise ValueError(f"EngineConfig.kv_transfer_timeout must be a positive number of seconds, "
                             f"got {self.kv_transfer_timeout!r}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"EngineConfig.kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"EngineConfig.kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.device is not None and not isinstance(self.device, str):
            raise ValueError(f"EngineConfig.device must be a string like 'cpu' or 'cuda:0', got {self.device!r}")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError("EngineConfig.dtype must be None, 'float32', 'bfloat16' or 'float16', "
                             f"got {self.dtype!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"EngineConfig.seed must be an integer, got {self.seed!r}")


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
