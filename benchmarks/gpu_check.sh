#!/usr/bin/env bash
# What only a CUDA GPU can prove, in one run of 9 minutes at most (every part under `timeout`, all
# of them inside GPU_CHECK_BUDGET_S, default 540 s):
#   versions   nvidia-smi, torch, Triton, and the packages .whl/ brought
#   model      where MODEL is unset and the bundled model was never converted here (a machine with
#              no network cannot fetch it): benchmarks/synthetic_model.py builds random weights of
#              its shape, for speed only
#   tests      every test file with a CUDA path (tests that need what this machine lacks skip),
#              the Triton kernels compiled for the GPU (TRITON_INTERPRET=0)
#   serve      python -m minicake.serve (1 prefill + 1 decode instance over NCCL on 2+ GPUs, else
#              colocated on one: NCCL cannot put two ranks on one GPU) answering python -m minicake.bench ~30 s
#   kernels    benchmarks/kernel_bench.py: paged attention against torch's SDPA, % of HBM bandwidth
#   throughput, single_stream (CUDA graphs), then both again with --enforce-eager: against
#              transformers on the same GPU; single_stream's ms/token is the batch-1 decode step
# Then a table of the parts and of the issue's goals, and one JSON line for each. Exits 1 if a part
# failed, 2 (in one line) where torch sees no CUDA GPU. Needs a CUDA torch, triton, transformers,
# pytest, rich, httpx and minicake's other dependencies; where a folder .whl/ holds wheels (those
# `bash benchmarks/gpu_wheels.sh` downloads for a Python 3.12 image that lacks fastapi, uvicorn,
# pyzmq, ...), it installs them into /tmp/site first. The repository runs in place (no pip install)
# and writes nowhere but /tmp. Logs go to GPU_CHECK_LOGS (default: a new folder under /tmp).
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
# On a lent machine that reaches no network (this workplace's device tool), after gpu_wheels.sh;
# a lent machine has 15 device minutes in all, its start included, so the first call keeps the
# budget short enough to leave room for one rerun after a fix:
#   run(command='set -o pipefail; GPU_CHECK_BUDGET_S=330 bash benchmarks/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log',
#       carry=[".whl"], timeout_s=360)
set -uo pipefail
cd "$(dirname "$0")/.."
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-540}))  # the parts' kill grace (10 s) fits in the rest of 600
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
BUNDLED=${MINICAKE_CACHE:-${HOME:-}/.cache/minicake}/smollm2-135m  # where an earlier run converted it
export MINICAKE_CACHE=${MINICAKE_CACHE:-/tmp/gpu_check-cache} TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/gpu_check-triton}
export PY=${PYTHON:-python3} PORT=${PORT:-8765}
GPUS=$(timeout 120 $PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null)
if [[ ! "$GPUS" =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_check: $PY's torch sees no CUDA GPU here; nothing was checked"
    exit 2
fi
export GPUS
if compgen -G ".whl/*.whl" >/dev/null; then
    timeout 120 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "gpu_check: the wheels in .whl/ did not install into /tmp/site"; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [[ -n "${MODEL:-}" ]]; then
    MODEL_NOTE="MODEL=$MODEL"
elif [[ -f "$BUNDLED/config.json" ]]; then
    MODEL=$BUNDLED MODEL_NOTE="the bundled model, converted in $BUNDLED"
else
    MODEL=/tmp/gpu_check-smollm2-135m-shape.$$
    MODEL_NOTE="random weights of the bundled model's shape: speed only"
fi
export MODEL
echo "model: $MODEL ($MODEL_NOTE)"
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$LOGS"
status=0
PARTS=()

part() {  # part NAME BUDGET_S COMMAND...: COMMAND under timeout, its output shown and kept in $LOGS/NAME.log
    local name=$1 budget=$2 start=$SECONDS rc
    shift 2
    (( budget > DEADLINE - SECONDS )) && budget=$((DEADLINE - SECONDS))
    if (( budget < 10 )); then
        echo "== $name: no time left ==" | tee "$LOGS/$name.log"
        rc=124
    else
        echo "== $name (at most ${budget} s) =="
        timeout -k 10 "$budget" "$@" 2>&1 | tee "$LOGS/$name.log"
        rc=${PIPESTATUS[0]}
    fi
    PARTS+=("$name $rc $((SECONDS - start))")
    (( rc == 0 )) || status=1
}

serve_and_bench() {  # the server on this machine's layout, the bench client against it for ~30 s
    local layout=(--colocated) server up=0 rc=1
    if (( GPUS >= 2 )); then
        layout=(--prefill 1 --decode 1)
        echo "layout: 1 prefill + 1 decode instance, K/V over NCCL (cuda:0 -> cuda:1)"
    else
        echo "layout: colocated on cuda:0 (one GPU: NCCL cannot put the prefill and the decode rank on one GPU)"
    fi
    $PY -m minicake.serve --model "$MODEL" --port "$PORT" "${layout[@]}" --max-model-len 2048 &
    server=$!
    trap 'kill -TERM $server 2>/dev/null' EXIT
    for _ in $(seq 150); do  # the model loads and the kernels warm up before /health answers
        $PY -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
            "http://127.0.0.1:$PORT/health" 2>/dev/null && { up=1; break; }
        kill -0 "$server" 2>/dev/null || break
        sleep 1
    done
    if (( up )); then
        $PY -m minicake.bench --base-url "http://127.0.0.1:$PORT" --rate 4 --num-requests 120 \
            --input-len 256 --output-len 64
        rc=$?
    else
        echo "the server never answered /health"
    fi
    kill -TERM "$server" 2>/dev/null
    wait "$server"  # drains, then exits; the part's timeout bounds this
    return $rc
}
export -f serve_and_bench

versions() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, \
'gpus', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
    $PY -c "import fastapi, gguf, openai, pydantic, pytest, transformers, uvicorn, zmq, minicake.serve.api; \
print(*(f'{m.__name__} {m.__version__}' for m in (transformers, pytest, fastapi, pydantic, uvicorn, zmq, openai)))"
}
export -f versions

mapfile -t CUDA_TESTS < <(grep -l 'torch\.cuda\.\(is_available\|device_count\)()' tests/test_*.py)
part versions 30 bash -c versions
[[ "$MODEL_NOTE" == random* ]] && part model 60 $PY benchmarks/synthetic_model.py "$MODEL"
part tests 150 $PY -m pytest -q -p no:cacheprovider --durations=5 "${CUDA_TESTS[@]}"
part serve 150 bash -c serve_and_bench
part kernels 100 $PY benchmarks/kernel_bench.py
part throughput 90 $PY benchmarks/throughput.py --device cuda --model "$MODEL"
part single_stream 60 $PY benchmarks/single_stream.py --device cuda --model "$MODEL"
part throughput_eager 50 $PY benchmarks/throughput.py --device cuda --enforce-eager --skip-hf --model "$MODEL"
part single_stream_eager 60 $PY benchmarks/single_stream.py --device cuda --enforce-eager --model "$MODEL"

$PY - "$LOGS" "${PARTS[@]}" <<'EOF' || status=1
"""The table of parts and goals, and their JSON lines, from each part's log."""
import json
import sys
from pathlib import Path

logs, parts = Path(sys.argv[1]), [p.split() for p in sys.argv[2:]]


def last_json(name: str) -> dict:
    """The part's last JSON line; {} for a part that printed none."""
    lines = (logs / f"{name}.log").read_text(errors="replace").splitlines()
    return next((json.loads(x) for x in reversed(lines) if x.startswith("{")), {})


failed = 0
print(f"\n{'part':<20} {'exit':>5} {'seconds':>8}  result")
for name, rc, seconds in parts:
    result = "ok" if rc == "0" else "TIMED OUT" if rc in ("124", "137") else "FAILED"
    print(f"{name:<20} {rc:>5} {seconds:>8}  {result}")
    print(json.dumps({"part": name, "exit": int(rc), "seconds": int(seconds)}))
bench = last_json("serve")
if bench and (bench.get("failed") or not bench.get("completed")):
    print(f"serve: {bench.get('failed')} of {bench.get('requests')} requests failed: {bench.get('errors')}")
    failed = 1

decode = [r for r in last_json("kernels").get("rows", []) if r["phase"] == "decode" and r.get("frac_peak")]
best = max(decode, key=lambda r: r["frac_peak"], default=None)
step_ms = last_json("single_stream").get("minicake_ms_per_token")
speedup = last_json("throughput").get("speedup_vs_hf")
goals = [
    ("decode attention, best shape, share of HBM bandwidth", best and best["frac_peak"], ">=", 0.70,
     best and f"batch {best['batch']}, context {best['context_len']}"),
    ("batch-1 decode step with CUDA graphs, ms", step_ms, "<=", 1.5, "single_stream's ms/token"),
    ("offline throughput / transformers' batched generate", speedup, ">=", 10.0, "throughput.py, graphs on"),
]
print(f"\n{'goal':<55} {'measured':>10} {'target':>10}  met")
for goal, value, op, target, where in goals:
    met = None if value is None else (value >= target if op == ">=" else value <= target)
    print(f"{goal:<55} {'-' if value is None else value:>10} {op + ' ' + str(target):>10}  "
          f"{'not measured' if met is None else 'yes' if met else 'NO'}")
    print(json.dumps({"goal": goal, "measured": value, "target": f"{op} {target}", "met": met, "where": where}))
sys.exit(failed)
EOF
echo "model: $MODEL ($MODEL_NOTE)"
echo "logs: $LOGS"
exit $status
