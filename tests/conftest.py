"""Shared test setup. TRITON_INTERPRET must be set before triton is first imported, so the
Triton kernels run on the CPU through the interpreter."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.manual_seed(0)


# --- model fixtures (tests/model_fixtures.py builds them) ---
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(arch) -> directory of a tiny random "llama" | "qwen2" | "qwen3" model
    saved by transformers, with a small byte-level BPE tokenizer and a ChatML template."""
    from model_fixtures import build_tiny_checkpoint
    built = {}

    def make(arch: str):
        if arch not in built:
            built[arch] = tmp_path_factory.mktemp(f"tiny-{arch}")
            build_tiny_checkpoint(arch, built[arch])
        return built[arch]
    return make


@pytest.fixture(scope="session")
def bundled_model_dir():
    """The converted smollm2-135m directory (downloaded and converted on first use)."""
    from minicake.model.loader import resolve_model
    return resolve_model("smollm2-135m")
