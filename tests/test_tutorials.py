"""Every tutorial chapter runs from top to bottom as a plain script and passes its own checks.

Each chapter asserts what it teaches (logits equal transformers', the kernel equals torch,
...), so a chapter that exits 0 is a chapter whose claims still hold. Figures go to a
temporary directory (MINICAKE_FIGURES), so a test run leaves the committed PNGs alone.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
CHAPTERS = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
TIMEOUT_S = 300  # a chapter takes well under two minutes on an idle 2-core machine


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_runs_and_its_checks_pass(chapter, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a chapter sets it itself
    env |= {"MINICAKE_FIGURES": str(tmp_path), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(chapter)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{chapter.name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
