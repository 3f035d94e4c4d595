#!/usr/bin/env bash
# The GPU checks in one script, under 8 minutes on one H100/H200, with only the device image's packages
# (torch, torchvision, timm, accelerate, opencv, matplotlib: no wandb, DALI, FFCV, openpyxl).
#   device tool:  bash bench/gpu_check.sh          (from the repository root; results land in $OUT)
#   by hand:      OUT=bench/results/<device> bash bench/gpu_check.sh
# Each stage has its own time limit, so one slow stage cannot eat the others; stage exit codes go to status.txt.
set -uo pipefail
export PYTHONPATH=.
OUT=${OUT:-bench/results/gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
work=$(mktemp -d)
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$OUT/status.txt"
  tail -n 15 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
stage data 60 bash -c "$PY -m prep sample --out $work/raw --n 2000 --workers 16 --no-metadata && \
  $PY -m prep covid --src $work/raw/COVID-19_Radiography_Dataset --out $work/packed --workers 16"
if $PY -c "import pytest" 2>/dev/null; then
  stage gpu_tests 60 $PY -m pytest -q -m gpu tests/test_augment.py tests/test_loader.py -p no:cacheprovider
else
  echo "gpu_tests skipped: pytest is not installed on this machine" | tee -a "$OUT/status.txt"
fi
stage pipeline 60 $PY bench/pipeline.py --data "$work/packed" --device cuda --backends native,baseline \
  --batch-size 256 --batches 20 --json "$OUT/pipeline.json"
# Both benchmarks below save after every row or cell: a stage cut short by its limit keeps what it measured.
stage train_speed 150 $PY bench/train_speed.py --device cuda --data "$work/packed" --backends native \
  --batch-sizes 128,256 --steps 20 --warmup 5 --json "$OUT/train_speed.json"
stage resources 120 $PY bench/resources.py --device cuda --resolutions 224,384 --batch-sizes 128,256,512 \
  --backbones resnet18,resnet50 --channels 1 --steps 5 --warmup 2 --memory-cap 8GiB --out "$OUT/resources"
echo "results in $OUT"; cat "$OUT/status.txt"
