#!/usr/bin/env bash
# Set up fastflat on a fresh Debian machine: Fashion-MNIST from Debian, a virtualenv in .venv with
# torch + torchvision, and fastflat itself (editable, with test extras). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo "sudo")
PY=${PYTHON:-python3}

# 0) Debian's python3 makes virtualenvs only with python3-venv installed.
if ! "$PY" -c "import venv, ensurepip" 2>/dev/null && command -v apt-get >/dev/null; then
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv >/dev/null
fi

# 1) Real data offline: Debian's package puts Fashion-MNIST under /usr/share/datasets/fashion-mnist.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "setup: could not install dataset-fashion-mnist; fastflat will download Fashion-MNIST instead" >&2
fi

# 2) Python environment. torch/torchvision are pinned to the releases this project is tested with;
#    pyproject admits torch 2.11-2.14 for machines that already have one.
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -c "import torch, torchvision" 2>/dev/null \
  || .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "setup: ready ($(.venv/bin/python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'))"
