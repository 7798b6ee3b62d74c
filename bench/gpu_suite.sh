#!/usr/bin/env bash
# The GPU-only tests and every GPU benchmark, in at most ~10 minutes on one H100 (16 cores), then a summary.
# Run from the checkout on the GPU machine:  bash bench/gpu_suite.sh
# Results land in bench/results/ (JSON + the train ablation's .md table and .png plot); logs in $LOGS.
# Each step has a time budget; a step that no longer fits in what is left of TOTAL is skipped, and says so;
# an interrupted `bench train` still records the rows it finished.
# Environment: PYTHON (default .venv/bin/python, else python3), TOTAL seconds (default 590), LOGS folder.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
TOTAL=${TOTAL:-590}
LOGS=${LOGS:-$(mktemp -d -t fastcd-gpu-suite.XXXX)}
mkdir -p "$LOGS"
CONFIG=configs/imagenet/s_resnet18.t_resnet34.cd.kdv2.lrdv2.yaml
START=$(date +%s)
SUMMARY=()

fastcd() { "$PYTHON" -m fastcd.cli "$@"; }

# step NAME BUDGET_S COMMAND...: run COMMAND under `timeout`, log it, add a summary line.
step() {
  local name=$1 budget=$2
  shift 2
  local left=$(( TOTAL - ($(date +%s) - START) ))
  if (( left < budget / 2 )); then
    SUMMARY+=("$(printf '%-26s SKIPPED (needs ~%ss, %ss left)' "$name" "$budget" "$left")")
    return
  fi
  (( budget > left )) && budget=$left
  local t0 rc
  t0=$(date +%s)
  echo "== $name (budget ${budget}s) -> $LOGS/$name.log"
  timeout --signal=INT --kill-after=10 "$budget" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  local status="ok"
  (( rc == 124 || rc == 137 )) && status="TIMED OUT"
  (( rc != 0 && rc != 124 && rc != 137 )) && status="FAILED (rc $rc)"
  SUMMARY+=("$(printf '%-26s %-16s %4ss  %s' "$name" "$status" "$(( $(date +%s) - t0 ))" "$(tail -n 1 "$LOGS/$name.log")")")
}

"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_suite: no CUDA device visible to $PYTHON; run this on the GPU machine" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# 1. GPU-only tests: the CUDA C++ extension (slow-marked) and the Triton kernels on CUDA tensors.
step tests 110 "$PYTHON" -m pytest -q -p no:cacheprovider -m "slow or not slow" \
  tests/test_cuda_ext.py tests/test_kernels_cd.py tests/test_kernels_gkd.py

# 2. Loss kernels: eager vs torch.compile vs Triton vs CUDA C++ at ResNet-18/34 stage shapes.
step bench-kernels 60 fastcd bench kernels

# 3. Training step ablation at the real size: ResNet-34 -> ResNet-18, batch 256, 176 px, on-device data.
step bench-train-ablation 260 fastcd bench train "$CONFIG" --ablation --steps 30 --warmup 10 \
  --set data.res=176 --set data.val_res=176

# 4. The same step fed by each loader (ImageFolder/PIL, torch, FFCV: CPU decode; DALI: GPU decode) over
#    4096 generated ImageNet-like JPEGs, prepared here first; compile and CUDA graphs were measured in 3.
step bench-train-loaders 130 fastcd bench train "$CONFIG" --ablation --data loader --images 4096 \
  --steps 20 --warmup 8 --skip "torch.compile,CUDA graphs" --set data.res=176 --set data.workers=12

# 5. Loaders alone (no training), if time is left: GPU (DALI mixed) vs CPU decode.
step bench-loader 60 fastcd bench loader "${TMPDIR:-/tmp}/fastcd-bench-train/prepared-4096" --res 176 --epochs 1 \
  --workers 12 --backends imagefolder,torch,ffcv,dali

echo
echo "== summary ($(( $(date +%s) - START ))s of ${TOTAL}s; logs in $LOGS)"
printf '%s\n' "${SUMMARY[@]}"
echo
echo "results written:"
find bench/results -newermt "@$START" -type f | sort
grep -h "knob that bought the most" "$LOGS"/bench-train-*.log 2>/dev/null || true
