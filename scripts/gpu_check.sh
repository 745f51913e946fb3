# One prepared command for a borrowed GPU (device tool): the GPU tests, then the
# kernel, training, ES-memory and landscape benchmarks, in under 9 minutes, results named by the device. Run from the repo root:
#
#   bash scripts/gpu_check.sh                 # on the GPU machine (its own torch 2.11 / triton 3.6)
#   bash scripts/gpu_check.sh --cpu-smoke     # here, to check the script itself (tiny sizes, no GPU)
#
# The GPU machine is offline. typer, rich, pyyaml, matplotlib and pytest must be there already, or be
# carried as wheels: `pip download -d .whl typer rich pyyaml matplotlib pytest` here, then name `.whl`
# in the device tool's `carry`. fastflat itself runs from this tree (PYTHONPATH), nothing installed.
# Results: benchmarks/results/gpu-<device>-<UTC time>/ (commit them), and one .tar.gz of it in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SMOKE=$([ "${1:-}" = "--cpu-smoke" ] && echo 1 || echo 0)

# 0) Dependencies: carried wheels first, then check every import once (one clear line if missing).
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --find-links .whl typer rich pyyaml matplotlib pytest 2>&1 | tail -2
fi
if ! $PY -c "import torch, triton, typer, rich, yaml, matplotlib, pytest" 2>/tmp/gpu_check_imports; then
  echo "gpu_check: missing a package ($(tail -1 /tmp/gpu_check_imports)); carry wheels in .whl (see the header)" >&2
  exit 2
fi
if [ "$SMOKE" = 0 ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch sees no CUDA device; run with --cpu-smoke to check the script on a CPU" >&2
  exit 2
fi

# 1) Where results go: named by the device and the time, with the versions beside them.
DEVICE=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')")
SLUG=$(echo "$DEVICE" | tr '[:upper:] ' '[:lower:]-' | tr -cd 'a-z0-9-')
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RESULTS=${RESULTS_ROOT:-benchmarks/results}/gpu-$SLUG-$STAMP
mkdir -p "$RESULTS"
{
  echo "device: $DEVICE"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo "${FASTFLAT_GIT_SHA:-unknown}")"
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__); print('triton', triton.__version__); print('cuda', torch.version.cuda)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
  echo "started: $STAMP"
} > "$RESULTS/provenance.txt"
cat "$RESULTS/provenance.txt"

STATUS=()
stage() {  # stage NAME SECONDS COMMAND...: bounded, logged, never stops the script
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  STATUS+=("$name: exit $rc after $((SECONDS - start))s")
}

if [ "$SMOKE" = 1 ]; then
  export FASTFLAT_BACKEND=torch
  stage tests 120 $PY -m pytest -q tests/test_gpu.py tests/test_kernels.py -k "gpu or deterministic"
  stage bench-kernels 120 $PY -m fastflat bench kernels --quick --sizes 2^10 --models none --dtypes fp32 --out "$RESULTS"
  stage bench-train 120 $PY -m fastflat bench train --model cnn --methods sgd,sam --steps 2 --warmup 1 --batch-size 16 --out "$RESULTS"
  stage bench-es-memory 60 $PY -m fastflat bench es-memory --children 8 --size 2^12 --out "$RESULTS"
  stage bench-landscape 60 $PY -m fastflat bench landscape --dataset synthetic --examples 64 --grid 2 --at-once 2 --out "$RESULTS"
else
  # 2) Compiled kernels against their twins at real sizes, SAM on ResNet-18, fp16 SGD/SAM runs, the kernel and AMP test files.
  stage tests 200 $PY -m pytest -q tests/test_gpu.py tests/test_kernels.py tests/test_noise.py tests/test_average.py tests/test_amp.py
  # 3) Every fused op against the per-parameter loop, foreach, torch.compile and copy bandwidth.
  stage bench-kernels 150 $PY -m fastflat bench kernels --out "$RESULTS"
  # 4) Steps/s of each method on ResNet-18 (CIFAR shape), and ES peak memory against K at ResNet-18 size.
  stage bench-train 90 $PY -m fastflat bench train --model resnet18 --methods sgd,sam,swa,spartan --out "$RESULTS"
  stage bench-es-memory 45 $PY -m fastflat bench es-memory --children 8,512 --size 11_173_962 --out "$RESULTS"
  # 5) Landscape points/s: the per-parameter loop against our per-point and vmapped scoring.
  stage bench-landscape 60 $PY -m fastflat bench landscape --dataset synthetic --examples 1024 --grid 8 --at-once 8,32 --out "$RESULTS"
fi

printf '%s\n' "${STATUS[@]}" | tee "$RESULTS/status.txt"
if [ -n "${OUT:-}" ]; then  # the device tool brings back files under $OUT: one archive of everything
  tar -czf "$OUT/$(basename "$RESULTS").tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" && echo "packed: $OUT/$(basename "$RESULTS").tar.gz"
fi
echo "results: $RESULTS (commit them with the device name)"
