#!/usr/bin/env bash
# The GPU check: every GPU path of effray once, and the figures the README quotes, in one
# script that a GPU machine runs in under 10 minutes (sized for one H200; it uses every
# GPU it sees where a step can).
#
#   bash bench/gpu_check.sh [--dry-run] [--source SRC] [--out DIR] [--python PY]
#
#   1. the real-CUDA tests (tests/cuda: the CUDA runtime's own host-sync guard on a
#      training step, structured pruning, RNG state, each command below on tiny data)
#   2. `effray data prepare` of SRC (default: the shared CIFAR-10 file; 45k train / 5k val)
#   3. `effray train` DDP on 1 GPU, resnet20 and airbench: images/s per GPU
#   4. the same on every GPU (NCCL), when there are 2 or more
#   5. a 2-stage pipeline (gpipe and 1f1b) on 2 GPUs, when there are 2 or more
#   6. delivered images/s into one GPU worker, a tiny model: CPU (Ray Data) vs GPU augmentation
#   7. `effray compress` (prune + 4-bit QAT + KD) and a 2-trial `effray tune` sharing the GPU
#   8. `effray synth train`, one epoch
#   9. airbench94's recipe, 10 epochs on one GPU: accuracy per epoch and time to 94 %
#
# --dry-run runs nothing: each effray command is parsed and validated (`effray --dry-run`,
# so every flag exists) and the CUDA tests are collected. It runs on any CPU machine and
# is part of the test suite (tests/unit/test_gpu_check_script.py).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
SOURCE="parquet:$(cd .. && pwd)/shared/data/cifar10-train.parquet"
OUT="$(pwd)/runs/gpu-check"
PY="${PYTHON:-.venv/bin/python}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --source) SOURCE="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --python) PY="$2"; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
: >"$LOG"
export RAY_DATA_DISABLE_PROGRESS_BARS=1 WANDB_MODE=offline PYTHONUNBUFFERED=1

if [[ $DRY == 1 ]]; then
  GPUS=2  # plan the multi-GPU steps too, so their flags get checked
else
  GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  if [[ $GPUS -lt 1 ]]; then
    echo "gpu_check: no CUDA GPU visible to $PY (use --dry-run on a CPU machine)" >&2
    exit 2
  fi
fi
CPUS=$(nproc)
CPW=$(( CPUS / (GPUS + 1) > 0 ? CPUS / (GPUS + 1) : 1 ))  # CPUs per GPU worker; the rest feed Ray Data

say() { echo "[gpu_check] $*"; }
# effray NAME ARGS...: run (or dry-run) one command; its JSON line goes to $OUT/NAME.json
effray() {
  local name="$1"; shift
  if [[ $DRY == 1 ]]; then  # queued: one Python parses them all at the end (torch + Ray import once)
    printf '%s\0' "$name" "$@" >"$QUEUE/$(printf '%02d' "$(ls "$QUEUE" | wc -l)")"
    return 0
  fi
  local t0=$SECONDS
  if "$PY" -m effray.cli "$@" >"$OUT/$name.out" 2>>"$LOG"; then
    grep '^{' "$OUT/$name.out" | tail -1 >"$OUT/$name.json"
    say "ok $name ($(( SECONDS - t0 )) s)"
  else
    say "FAILED $name ($(( SECONDS - t0 )) s): $(tail -1 "$LOG")"
    FAILED+=("$name")
  fi
}
# field NAME KEY: one value of a command's JSON line ("-" when it didn't run)
field() {
  "$PY" -c 'import json,sys
try: print(json.loads(open(sys.argv[1]).read()).get(sys.argv[2], "-"))
except Exception: print("-")' "$OUT/$1.json" "$2"
}
FAILED=()
QUEUE="$OUT/.dry-run-queue"
[[ $DRY == 1 ]] && { rm -rf "$QUEUE"; mkdir -p "$QUEUE"; }

say "$(date -u +%FT%TZ) out=$OUT gpus=$GPUS cpus=$CPUS dry_run=$DRY"
if [[ $DRY == 0 ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/[gpu_check] gpu: /'
  "$PY" -c "import torch, ray; print('[gpu_check] torch', torch.__version__, 'cuda', torch.version.cuda, 'ray', ray.__version__, 'bf16', torch.cuda.is_bf16_supported())"
fi

# 1. real-CUDA tests
if [[ $DRY == 1 ]]; then
  "$PY" -m pytest -q --collect-only -m cuda tests/cuda >>"$LOG" 2>&1 && say "ok (dry run) tests/cuda collected"
else
  if "$PY" -m pytest -q -m cuda tests/cuda -p no:cacheprovider >"$OUT/cuda_tests.out" 2>&1; then
    say "ok tests/cuda: $(tail -1 "$OUT/cuda_tests.out")"
  else
    say "FAILED tests/cuda: $(tail -1 "$OUT/cuda_tests.out")"; FAILED+=(cuda_tests)
  fi
fi

# 2. data
DATA="$OUT/cifar10"
if [[ $DRY == 1 || ! -f "$DATA/meta.json" ]]; then
  effray prepare data prepare --source "$SOURCE" --out "$DATA" --val-fraction 0.1 --seed 0
fi
RUNS="$OUT/runs"
COMMON=(--data "$DATA" --storage "$RUNS" --no-wandb --gpus-per-worker 1 --cpus-per-worker "$CPW" --data-cpus 1)

# 3.-4. DDP throughput per GPU
effray resnet20_1gpu train "${COMMON[@]}" --name resnet20-1gpu --model resnet20 --epochs 2 --batch-size 512 --workers 1
effray airbench_1gpu train "${COMMON[@]}" --name airbench-1gpu --model airbench --epochs 2 --batch-size 1024 --workers 1
if [[ $GPUS -ge 2 ]]; then
  effray resnet20_all train "${COMMON[@]}" --name "resnet20-${GPUS}gpu" --model resnet20 --epochs 2 --batch-size 512 --workers "$GPUS"
  effray airbench_all train "${COMMON[@]}" --name "airbench-${GPUS}gpu" --model airbench --epochs 2 --batch-size 1024 --workers "$GPUS"
fi

# 5. pipeline parallel
if [[ $GPUS -ge 2 ]]; then
  for schedule in gpipe 1f1b; do
    effray "pipeline_$schedule" train "${COMMON[@]}" --name "pipe-$schedule" --model resnet20 --epochs 1 --batch-size 512 \
      --workers 2 --parallel pipeline --stages 2 --microbatches 4 --pipeline-schedule "$schedule"
  done
else
  say "skip pipeline: needs 2 GPUs"
fi

# 6. what the input pipeline delivers to one GPU worker (a model too small to be the limit)
for where in cpu gpu; do
  effray "ingest_$where" train "${COMMON[@]}" --name "ingest-$where" --model convnet --width 0.25 --epochs 2 \
    --batch-size 512 --workers 1 --augment "crop(4)|flip|cutout(8)" --augment-on "$where"
done

# 7. compression and a search whose trials use the GPU
TEACHER="$(field resnet20_1gpu checkpoint)"  # the checkpoint the 1-GPU resnet20 run wrote
effray compress compress --teacher "$TEACHER" --data "$DATA" --out "$OUT/compressed" --overwrite --prune-rate 0.5 \
  --bits 4 --kd-alpha 0.9 --finetune-epochs 2 --workers 1 --gpus-per-worker 1 --cpus-per-worker "$CPW"
SPACE="$OUT/space.yaml"
printf 'prune_rate: {choice: [0.3, 0.6]}\nbits: {choice: [4, 8]}\nfinetune_epochs: 1\n' >"$SPACE"
effray tune tune --teacher "$TEACHER" --data "$DATA" --space "$SPACE" --num-samples 2 --scheduler none \
  --gpus-per-trial 0.5 --cpus-per-trial "$CPW" --storage "$RUNS" --name tune-gpu --no-wandb

# 8. the GAN
effray gan synth train --data "$DATA" --out "$OUT/gan" --epochs 1 --workers 1 --gpus-per-worker 1 \
  --cpus-per-worker "$CPW" --batch-size 256

# 9. airbench94's recipe (as bench/time_to_accuracy.py runs it), 10 epochs of the 45k split
effray airbench94 train "${COMMON[@]}" --name airbench94 --model airbench --epochs 10 --batch-size 1024 --lr 1.5 \
  --momentum 0.85 --weight-decay 1.33e-3 --decay-biases --label-smoothing 0.2 --bias-lr-scale 64 --lookahead --tta 2 \
  --warmup-epochs 2.3 --lr-start 0.2 --lr-end 0.07 --whiten-bias-epochs 3 --augment "crop(2)|altflip" --workers 1

if [[ $DRY == 1 ]]; then
  # each queued command through effray's own parser (`effray --dry-run`), in order; a
  # refused flag stops the script with exit 2, as running that command would
  "$PY" - "$QUEUE" "$OUT" 2>>"$LOG" <<'EOF' || exit 2
import contextlib, io, sys
from pathlib import Path
from effray.cli import main
queue, out = Path(sys.argv[1]), Path(sys.argv[2])
for item in sorted(queue.iterdir()):
    name, *args = item.read_bytes().decode().split("\0")[:-1]
    printed, complaint = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(complaint):
            rc = main(["--dry-run", *args])
    except SystemExit as exc:  # argparse: an unknown or misspelt flag
        rc = exc.code
    sys.stderr.write(complaint.getvalue())
    if rc != 0:
        last = (complaint.getvalue().strip().splitlines() or [f"exit {rc}"])[-1]
        print(f"[gpu_check] FLAGS REFUSED: {name}: {last}")
        sys.exit(2)
    (out / f"{name}.json").write_text(printed.getvalue())
    print(f"[gpu_check] ok (dry run) {name}: effray {' '.join(args)}", flush=True)
EOF
  say "dry run complete: every command parsed"
  exit 0
fi

# ------------------------------------------------------------------ figures
say "---- figures (img/s are whole-run means, validation included; ratios are the ones to quote)"
for run in resnet20_1gpu airbench_1gpu resnet20_all airbench_all pipeline_gpipe pipeline_1f1b; do
  [[ -f "$OUT/$run.json" ]] && say "$run: $(field "$run" images_per_s) img/s, val_acc $(field "$run" val_accuracy)"
done
if [[ -f "$OUT/resnet20_all.json" ]]; then
  "$PY" -c "import sys; a, b, g = map(float, sys.argv[1:]); print(f'[gpu_check] resnet20 scaling: {b / a:.2f}x on {g:g} GPUs ({b / a / g:.2f} per GPU)')" \
    "$(field resnet20_1gpu images_per_s)" "$(field resnet20_all images_per_s)" "$GPUS" || true
fi
say "ingest to one GPU worker: cpu augmentation $(field ingest_cpu images_per_s) img/s (data wait $(field ingest_cpu data_wait_s) s/epoch), gpu augmentation $(field ingest_gpu images_per_s) img/s (wait $(field ingest_gpu data_wait_s) s)"
say "compress: $(field compress accuracy) acc, $(field compress size_ratio)x smaller; tune: $(field tune finished) trials finished"
"$PY" - "$RUNS/airbench94/history.jsonl" <<'EOF' || true
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows:
    print(f"[gpu_check] airbench94 epoch {r['epoch']:>2}: val_acc {r['val_accuracy']:.4f} at {r['elapsed_s']:6.1f} s")
hit = next((r["elapsed_s"] for r in rows if r["val_accuracy"] >= 0.94), None)
print(f"[gpu_check] airbench94 time to 94%: {'not reached' if hit is None else f'{hit:.1f} s'} (45k train / 5k val split)")
EOF
if [[ ${#FAILED[@]} -gt 0 ]]; then
  say "FAILED: ${FAILED[*]} (details in $LOG)"
  exit 1
fi
say "all steps passed ($SECONDS s)"
