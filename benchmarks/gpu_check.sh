#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine that has torch but not this project's extras:
# CUDA/bf16 unit tests, DeiT-S 224 inference throughput (eager, compiled), DeepSpeed training step,
# nvjpeg decode + batched augmentation (data.decode=device) against the CPU path.
# Wheels for what that machine lacks are carried in .whl/ (timm, deepspeed, pydantic, hjson).
set -x
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COLUMNS=160
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, timm, deepspeed; print('torch', torch.__version__, 'timm', timm.__version__, 'deepspeed', deepspeed.__version__)"
cfvit() { python3 -m cfvit_cli "$@"; }
python3 -m pytest -q --noconftest -p no:cacheprovider tests/unit/test_model.py tests/unit/test_device_augment.py -k "cuda or nine or batch_invariance or streaming" 2>&1 | tee "$OUT/pytest_cuda.log" | tail -5
cfvit bench throughput --device cuda --bf16 --batch-size 1024 --batches 50 --json "$OUT/throughput_eager.json" 2>&1 | tee "$OUT/throughput_eager.txt"
timeout 200 python3 benchmarks/deepspeed_step.py --batch-size 256 --steps 15 --warmup 4 --zero 0 1 2 --json "$OUT/train_step.json" 2>&1 | grep -vE '^\[' | tee "$OUT/train_step.txt"
timeout 240 python3 -m cfvit_cli bench throughput --device cuda --bf16 --batch-size 1024 --batches 50 --compile --json "$OUT/throughput_compiled.json" 2>&1 | tail -30 | tee "$OUT/throughput_compiled.txt"
timeout 120 python3 -m benchmarks.device_decode --device cuda --n 512 --batch 256 --json "$OUT/device_decode.json" 2>&1 | tee "$OUT/device_decode.txt"
