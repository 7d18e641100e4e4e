"""Shared test setup. TRITON_INTERPRET must be set before triton is first imported, so the
Triton kernels run on the CPU through the interpreter."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.manual_seed(0)
