#!/usr/bin/env bash
# The GPU half of the kernel checks, for a machine with a CUDA GPU: the kernel tests with the kernels
# compiled for the GPU (TRITON_INTERPRET=0, tensors on cuda), then benchmarks/kernel_bench.py. Prints
# everything; exits non-zero if either part failed. Needs torch (CUDA build), triton, pytest, rich.
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
status=0
echo "== kernel tests on the GPU =="
timeout 300 $PY -m pytest -q -p no:cacheprovider --durations=5 \
    tests/test_kernel_paged_attention.py tests/test_kernel_store_kv.py tests/test_benchmark_kernels.py || status=1
echo "== benchmarks/kernel_bench.py =="
timeout 300 $PY benchmarks/kernel_bench.py || status=1
exit $status
