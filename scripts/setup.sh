#!/usr/bin/env bash
# Set up a fresh machine: system packages (Fashion-MNIST, Chromium for the page test), a virtualenv in
# .venv with torch first (from the local wheel cache where the machine has one), then the project.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

apt_pkgs=()
[ -d /usr/share/datasets/fashion-mnist ] || apt_pkgs+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || apt_pkgs+=(chromium)
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: apt-get install ${apt_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
  else
    echo "setup: please install these system packages: ${apt_pkgs[*]}" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision first, pinned: they come from the local disk here (CUDA build on x86-64).
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -c requirements/constraints.txt -e ".[dev]"
# checkov (the test suite's infrastructure checks) in a virtualenv of its own: its pins conflict with the
# project's (requirements/checkov.txt).
[ -x .venv-checkov/bin/python ] || "$PY" -m venv .venv-checkov
.venv-checkov/bin/python -m pip install -q -r requirements/checkov.txt
.venv/bin/python -c "import cfvit, ray, deepspeed, mlflow; print('setup: ok — torch', __import__('torch').__version__, '· ray', ray.__version__, '· deepspeed', deepspeed.__version__, '· mlflow', mlflow.__version__)"
