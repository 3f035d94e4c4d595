#!/usr/bin/env bash
# The GPU checks in one script, under 8 minutes on one H100/H200, with only the device image's packages
# (torch, torchvision, timm, accelerate, opencv, matplotlib, pytest: no wandb, DALI, FFCV, openpyxl).
#   device tool:  bash bench/gpu_check.sh          (from the repository root; results land in $OUT)
#   by hand:      OUT=bench/results/<device> bash bench/gpu_check.sh
#   dry run here: DEVICE=cpu OUT=/tmp/check bash bench/gpu_check.sh   (stages hit their limits; checks the wiring)
# Each stage has its own time limit, so one slow stage cannot eat the others; stage exit codes go to status.txt.
# The device tool returns at most 8 files from $OUT, so every log and result is packed into $OUT/results.tar.gz,
# re-packed after each stage: a run cut short still brings back what it finished.
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/gpu}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
N=${N:-4000}  # generated images: ~11 batches of 256 per epoch, so epoch restarts do not dominate
SKIP=${SKIP:-}  # stage names to leave out, e.g. SKIP="pipeline"
BACKBONES=${BACKBONES:-resnet18}  # of the resources grid
mkdir -p "$OUT"
work=$(mktemp -d)
res=$work/results
mkdir -p "$res"
export TWINRAY_BENCH_RESULTS=$work/record  # each --json below is what comes back; the record copies stay out
pack() {
  tar -czf "$OUT/results.tar.gz" -C "$res" .
  cp "$res/status.txt" "$OUT/status.txt" 2>/dev/null || true
}
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  if [[ " $SKIP " == *" $name "* ]]; then echo "$name skipped" | tee -a "$res/status.txt"; return; fi
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" > "$res/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$res/status.txt"
  tail -n 12 "$res/$name.log"
  pack
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u; \
  $PY -c "import torch, torchvision, timm, accelerate; print(torch.__version__, torchvision.__version__, \
  timm.__version__, accelerate.__version__)"; } > "$res/device.txt" 2>&1
cat "$res/device.txt"
stage data 35 bash -c "$PY -m prep sample --out $work/raw --n $N --workers 16 --no-metadata && \
  $PY -m prep covid --src $work/raw/COVID-19_Radiography_Dataset --out $work/jpeg --workers 16 && \
  $PY -m prep covid --src $work/raw/COVID-19_Radiography_Dataset --out $work/npy --encoding npy --workers 16"
# Every GPU-marked test (tests/test_cache.py's cache=device and cache=host on CUDA among them). The files left out
# hold none and need what the machine lacks at import:
# openpyxl (covid, sample) or ../shared (chexpert, folder, images). CI runs them.
# The longest one (pretrain.py compiled on CUDA) first, so that a stage cut short loses only quick ones.
gpu_tests() {
  $PY -m pytest -v -rs -m gpu -p no:cacheprovider tests/test_pretrain.py
  local first=$?
  $PY -m pytest -v -rs -m gpu -p no:cacheprovider tests --ignore=tests/test_pretrain.py --ignore=tests/test_covid.py \
    --ignore=tests/test_sample.py --ignore=tests/test_chexpert.py --ignore=tests/test_folder.py \
    --ignore=tests/test_images.py
  return $((first | $?))
}
export -f gpu_tests
export PY
stage gpu_tests 135 bash -c gpu_tests
# Loader alone, no model: native on JPEG with no cache (nvJPEG every batch), the host cache (pinned staging, one
# copy per batch) and the device cache (a gather on the GPU; target 30,000 pairs/s on an H200), each cache's one fill
# timed apart (fill_s); then native on npy, then native beside the study's baseline, for the ratio.
stage pipeline 65 bash -c "$PY bench/pipeline.py --data $work/jpeg --device $DEVICE --backends native \
  --caches none,host,device --batch-size 256 --batches 40 --json $res/pipeline-native.json && \
  $PY bench/pipeline.py --data $work/npy --device $DEVICE --backends native \
  --batch-size 256 --batches 40 --json $res/pipeline-npy.json && \
  $PY bench/pipeline.py --data $work/jpeg --device $DEVICE --backends native,baseline \
  --batch-size 256 --batches 10 --json $res/pipeline.json"
# The benchmarks below save after every row or cell: a stage cut short by its limit keeps what it measured.
# The trainer's step and loop (train_speed: build_run, train_step, StepMeter), warm-up excluded, CUDA events: the
# study's (a) and twinray's (d) settings first, so that a stage cut short still holds the ratio; end to end with the
# native loader without a cache and with the device cache.
stage train_speed 85 $PY bench/train_speed.py --device "$DEVICE" --data "$work/jpeg" --backends native \
  --caches none,device --configs a,d,c,b --batch-sizes 128 --steps 20 --warmup 5 --json "$res/train_speed.json"
# torch.compile's modes on twinray's step (d), synthetic batches: the default (its graph is in the FX cache from the
# stage above), CUDA graphs, then max-autotune without CUDA graphs (the longest compile, last). The CUDA default
# (config compile_mode) changes only on this measurement.
stage compile_modes 50 $PY bench/train_speed.py --device "$DEVICE" --configs d \
  --compile-modes default,reduce-overhead,max-autotune-no-cudagraphs --batch-sizes 128 --steps 20 --warmup 5 \
  --json "$res/compile_modes.json"
# What each pretraining method costs (docs/methods.md): images/s and the allocator's peak at the
# study's batch, bf16 eager (config c, no compile time), synthetic batches, each method at its defaults.
stage methods 40 $PY bench/train_speed.py --device "$DEVICE" --methods barlow,simclr,moco,byol,vicreg --configs c \
  --batch-sizes 128 --steps 10 --warmup 3 --json "$res/methods.json"
# The study's setting (fp32, eager) over a small grid, then --compare: the study's against twinray's at 224 px.
stage resources 70 $PY bench/resources.py --device "$DEVICE" --resolutions 128,224 --batch-sizes 64,128,256 \
  --backbones "$BACKBONES" --channels 1 --steps 5 --warmup 2 --memory-cap 8GiB --timeout 60 --compare \
  --out "$res/resources"
echo "results in $OUT/results.tar.gz"
cat "$res/status.txt"
