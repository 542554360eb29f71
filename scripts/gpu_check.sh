#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU, in under 8 minutes,
#   1. installs what it needs in a virtual environment (tensorrt, pycuda, the project),
#   2. builds FP32 and FP16 TensorRT engines for every shipped bundle (models/*/) and
#      self-tests each (segwatch-agent build-engine),
#   3. runs the backend tests, whose GPU tests must run here, not skip,
#   4. benchmarks inference (U-Net: ONNX Runtime, LiteRT, TensorRT FP32 and FP16),
#   5. runs the agent end to end with the TensorRT backend on a replay through its own
#      Mosquitto (bench/agent.py --backend tensorrt) and checks that TensorRT served it.
# Figures go to results/bench-*-gpu.json and are printed.
#
# Usage: scripts/gpu_check.sh            (from anywhere; works in the repository root)
# Environment: GPU_VENV (default .venv-gpu; point it at an existing venv to skip the
# install), PYTHON (default python3). Needs network access for pip on a fresh machine, and
# the CUDA toolkit's headers for pycuda's build (JetPack and the CUDA containers have
# them; elsewhere install cuda-toolkit or set CUDA_ROOT).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$(date +%s)
BUDGET=480

step() { printf '\n== [%3ss] %s\n' "$(($(date +%s) - START))" "$*"; }
fail() { printf '\nGPU CHECK FAILED after %ss: %s\n' "$(($(date +%s) - START))" "$*" >&2; exit 1; }
# run SECONDS CMD...: the command under a timeout; a timeout is a failure with its name.
run() {
    local seconds=$1
    shift
    local rc=0
    timeout --kill-after=10 "$seconds" "$@" || rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        fail "timed out after ${seconds}s: $*"
    fi
    return "$rc"
}

step "GPU and driver"
command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: no NVIDIA driver here"
run 30 nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total \
    --format=csv,noheader || fail "nvidia-smi cannot talk to the driver"

step "Mosquitto (for the end-to-end run)"
if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        run 180 apt-get -qq update || fail "apt-get update failed"
        run 180 env DEBIAN_FRONTEND=noninteractive apt-get -qq install -y mosquitto \
            >/dev/null || fail "apt-get install mosquitto failed"
    else
        fail "mosquitto is not installed; install it (apt-get install mosquitto)"
    fi
fi
echo "mosquitto: $(command -v mosquitto || echo /usr/sbin/mosquitto)"

step "Python environment"
PYTHON=${PYTHON:-python3}
VENV=${GPU_VENV:-.venv-gpu}
if [ ! -x "$VENV/bin/python" ]; then
    run 120 "$PYTHON" -m venv "$VENV" || fail "$PYTHON -m venv failed (install python3-venv)"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import tensorrt, pycuda.driver, agent, tensorflow, pytest" 2>/dev/null; then
    if ! command -v nvcc >/dev/null && [ -z "${CUDA_ROOT:-}" ] && [ ! -d /usr/local/cuda ]; then
        echo "warning: no nvcc, CUDA_ROOT or /usr/local/cuda: pycuda may fail to build" >&2
    fi
    run 60 "$PY" -m pip install -q --disable-pip-version-check --upgrade pip \
        || fail "pip cannot upgrade itself (network?)"
    run 300 "$PY" -m pip install -q --disable-pip-version-check \
        -e '.[tensorrt,trainer,dev]' \
        || fail "pip install of tensorrt, pycuda and the project failed (network? CUDA headers?)"
fi
run 60 "$PY" - <<'EOF' || fail "tensorrt or pycuda cannot use the GPU"
import pycuda.driver as cuda
import tensorrt

cuda.init()
device = cuda.Device(0)
print(f"tensorrt {tensorrt.__version__}, GPU {device.name()}, compute capability "
      f"{'.'.join(map(str, device.compute_capability()))}")
EOF

step "TensorRT engines for the shipped bundles (build + self-test)"
found=0
for bundle in models/*/; do
    [ -f "$bundle/bundle.json" ] || continue
    found=1
    for precision in fp32 fp16; do
        echo "-- $bundle $precision"
        run 240 "$VENV/bin/segwatch-agent" build-engine --bundle "$bundle" \
            --precision "$precision" || fail "engine $precision for $bundle"
    done
done
[ "$found" -eq 1 ] || fail "no bundle under models/"

step "Backend tests (the GPU tests must run, not skip)"
log=$(mktemp)
run 300 "$PY" -m pytest -q -rs tests/test_backends.py 2>&1 | tee "$log" \
    || fail "tests/test_backends.py failed"
if grep -q "needs TensorRT on a GPU" "$log"; then
    fail "the GPU tests skipped: see the reasons above"
fi
rm -f "$log"

step "Inference benchmark (U-Net)"
run 240 "$PY" bench/inference.py --models unet \
    --backends keras-per-snapshot,onnxruntime,litert,tensorrt-fp32,tensorrt-fp16 \
    --seconds 1 --out results/bench-inference-gpu.json || fail "bench/inference.py"

step "Agent end to end on TensorRT (replay through Mosquitto)"
run 240 "$PY" bench/agent.py --backend tensorrt --out results/bench-agent-gpu.json \
    || fail "bench/agent.py --backend tensorrt"
run 30 "$PY" - <<'EOF' || fail "the agent did not run on TensorRT"
import json

record = json.load(open("results/bench-agent-gpu.json"))
backend = record.get("agent_backend") or {}
print(f"agent backend: {backend}")
raise SystemExit(0 if str(backend.get("backend", "")).startswith("tensorrt") else 1)
EOF

elapsed=$(($(date +%s) - START))
step "done in ${elapsed}s (budget ${BUDGET}s)"
if [ "$elapsed" -gt "$BUDGET" ]; then
    echo "warning: over the ${BUDGET}s budget; the slow step is the one with the big jump above"
fi
echo "results: results/bench-inference-gpu.json results/bench-agent-gpu.json"
