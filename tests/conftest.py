"""Shared test setup. TRITON_INTERPRET must be set before triton is first imported, so the
Triton kernels run on the CPU through the interpreter; TRITON_INTERPRET=0 in the environment
compiles them for a GPU instead (benchmarks/gpu_check.sh)."""
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


# --- engine leak check (every test): no KV block or sequence outlives its request ---
@pytest.fixture(autouse=True)
def engines_leak_nothing():
    """After each test, every engine it created (or that was already alive) holds no request
    in any queue, and every KV block is free: unkeyed, or cached and evictable."""
    import minicake.engine
    registry = minicake.engine.LIVE_ENGINES
    alive_before = list(registry)
    created = set()  # strong references: a test's engine may be garbage by teardown
    minicake.engine.LIVE_ENGINES = created
    yield
    minicake.engine.LIVE_ENGINES = registry
    for engine in alive_before + list(created):
        registry.add(engine)
        bm, sched = engine.block_manager, engine.scheduler
        assert not sched.waiting and not sched.running and not engine.requests, \
            f"sequences left behind: {len(sched.waiting)} waiting, {len(sched.running)} running"
        assert [b.block_id for b in bm.blocks if b.ref_count] == [], "KV blocks still referenced"
        assert bm.num_free_blocks == bm.num_blocks, "free lists lost a block"
        assert set(bm.evictable) == set(bm.cached.values()), "a cached block is not evictable"


# --- server fixtures (tests/server_process.py starts them) ---
@pytest.fixture(scope="session")
def tiny_server(tiny_checkpoint):
    """`python -m minicake.serve --colocated` on the tiny llama, shared by the server and bench
    tests; it must exit with code 0 on SIGTERM."""
    from server_process import ServerProcess
    server = ServerProcess("--model", str(tiny_checkpoint("llama")), "--colocated",
                           "--max-model-len", "128", "--num-kv-blocks", "64",
                           "--served-model-name", "tiny")
    yield server
    assert server.stop() == 0, "the server did not exit cleanly on SIGTERM"
