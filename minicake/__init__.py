"""minicake: a small, readable rebuild of Mooncake's KVCache-centric, disaggregated LLM serving.

The offline API, as vLLM and nano-vllm export it: `from minicake import LLM, SamplingParams`.
These names are imported on first use, so that `python -m minicake.sim` and the trace tools
start without loading torch and the engine.
"""
import importlib

_EXPORTS = {"LLM": "minicake.llm", "RequestOutput": "minicake.llm",
            "SamplingParams": "minicake.sampling", "EngineConfig": "minicake.config"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'minicake' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
