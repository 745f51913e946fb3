#!/usr/bin/env bash
# Set up fastflat on a fresh Debian machine: Fashion-MNIST from Debian, a virtualenv in .venv with
# torch + torchvision, and fastflat itself (editable, with test extras). Safe to run again.
#
# Without a GPU it takes PyTorch's CPU-only wheels (a few hundred MB) from PyTorch's own index when that
# index answers, else the default build from PyPI (which bundles CUDA libraries: several GB). Root is
# not needed: without root or sudo the Debian packages are skipped with a note.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH="torch==${TORCH_VERSION:-2.14.1}"
TORCHVISION="torchvision==${TORCHVISION_VERSION:-0.29.1}"
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if [ "$(id -u)" -eq 0 ]; then SUDO=""
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo"
else SUDO="none"
fi

apt_install() {  # apt_install PACKAGE WHY: a Debian package, or a note saying what is missing and why
  if ! command -v apt-get >/dev/null; then return 1; fi
  if [ "$SUDO" = "none" ]; then
    echo "setup: not root and no sudo: skipping Debian's $1 ($2)" >&2
    return 1
  fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "$1" >/dev/null
}

# 0) Debian's python3 makes virtualenvs only with python3-venv installed.
if ! "$PY" -c "import venv, ensurepip" 2>/dev/null; then
  apt_install python3-venv "needed to make .venv" || { echo "setup: install python3-venv, then rerun" >&2; exit 1; }
fi

# 1) Real data offline: Debian's package puts Fashion-MNIST under /usr/share/datasets/fashion-mnist.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  apt_install dataset-fashion-mnist "fastflat will download Fashion-MNIST on first use instead" \
    || echo "setup: no dataset-fashion-mnist; fastflat will download Fashion-MNIST on first use" >&2
fi

# 2) Python environment. torch/torchvision are pinned to the releases this project is tested with;
#    pyproject admits torch 2.11-2.14 for machines that already have one.
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  build="default (PyPI)"
  if ! command -v nvidia-smi >/dev/null && .venv/bin/python - "$CPU_INDEX" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/", timeout=5)
except Exception:
    sys.exit(1)
EOF
  then
    .venv/bin/python -m pip install -q --index-url "$CPU_INDEX" --extra-index-url https://pypi.org/simple \
      "$TORCH" "$TORCHVISION" && build="CPU-only (PyTorch's index)" || build="default (PyPI)"
  fi
  if [ "$build" = "default (PyPI)" ]; then
    .venv/bin/python -m pip install -q "$TORCH" "$TORCHVISION"
  fi
  echo "setup: installed PyTorch, $build build"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
echo "setup: ready ($(.venv/bin/python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'); .venv is $(du -sh .venv | cut -f1))"
