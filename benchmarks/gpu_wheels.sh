#!/usr/bin/env bash
# The wheels that benchmarks/gpu_check.sh needs on a machine that reaches no package index: what
# minicake, its tests and benchmarks import that such a machine's image lacks (its Python 3.12 has
# torch, triton, transformers, pytest, rich, httpx, numpy, safetensors, tokenizers, msgpack,
# jinja2, prometheus_client, psutil, hypothesis, matplotlib, anyio, h11, click, requests, tqdm,
# pyyaml, annotated-doc), with what those need that it lacks too. One wheel each
# for CPython 3.12 on manylinux x86_64, at the version this virtualenv has, into .whl/ (kept out of
# git), then the size of .whl/ with the working tree, which must stay well under 64 MiB.
#   bash benchmarks/gpu_wheels.sh        # run with the project's virtualenv active
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MAX_MB=48  # .whl/ and the working tree together; a call carries 64 MiB at most
PACKAGES=(
    fastapi starlette pydantic pydantic-core annotated-types typing-inspection opentelemetry-api  # the HTTP API
    uvicorn                                     # its server
    pyzmq                                       # the control plane between instance processes
    gguf                                        # the bundled model's import
    openai httpx2 httpcore2 truststore jiter sniffio  # the API tests' client
    typing-extensions anyio  # the image has both, maybe older than pydantic (>= 4.16) and openai (>= 4.10) need
)
PLATFORMS=(--platform manylinux1_x86_64 --platform manylinux2014_x86_64)
for n in $(seq 17 39); do  # pip matches manylinux_2_N exactly; 2.39 is Ubuntu 24.04's glibc
    PLATFORMS+=(--platform "manylinux_2_${n}_x86_64")
done

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >>"$exclude"
rm -rf .whl  # one version of each: two stop the whole install there
mkdir .whl
for name in "${PACKAGES[@]}"; do
    version=$($PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") \
        || { echo "gpu_wheels: $name is not installed in $($PY -c 'import sys; print(sys.prefix)')" >&2; exit 1; }
    timeout 300 $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d .whl "$name==$version"
done
ls .whl

wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard \
    | $PY -c "import os, sys; print(sum(os.path.getsize(p) for p in sys.stdin.read().split('\0') if os.path.isfile(p)))")
total=$((wheels + tree))
echo "gpu_wheels: $(ls .whl | wc -l) wheels $((wheels >> 20)) MiB + working tree $((tree >> 20)) MiB" \
    "= $((total >> 20)) MiB of the 64 MiB a call carries"
if (( total > MAX_MB << 20 )); then
    echo "gpu_wheels: over ${MAX_MB} MiB, too close to the 64 MiB a call carries" >&2
    exit 1
fi
