#!/usr/bin/env bash
# Every GPU check and benchmark of fastcd in one run of at most 8 minutes on the bare GPU image (python3
# with torch, torchvision and triton; no DALI, FFCV or network), then a summary. What nobody has measured
# yet runs first, since a lease can end early.
#
#   bash bench/gpu_suite.sh --stage-data          # once, here: Fashion-MNIST into .gpu-data/ (ignored)
#   bash bench/gpu_suite.sh [--out DIR] [--dry-run] [--only STEP,...]
#
# On the device tool: run `bash bench/gpu_suite.sh` with carry [".gpu-data"], so the demo has its data.
# Steps, in order of value (a step that no longer fits in what is left of TOTAL seconds is skipped; every
# wait inside the suite is bounded by its step's budget):
#   install        fastcd into a throwaway venv over python3's packages (pip -e, offline, no deps)
#   env            GPU name, Python.h, nvcc, one Triton launch, one batched nvjpeg decode (bench/gpu_check.py)
#   train-fed      a) the step fed by the torch backend's GPU decode against the same step on on-device
#                  data, both compiled with CUDA graphs (ResNet-34 -> ResNet-18, batch 256, 176 px), on
#                  photo-like JPEGs of 300-500 px (generated and prepared in the background meanwhile):
#                  wall img/s, the data wait (CUDA events, and wall per step over the on-device step's),
#                  peak host and GPU memory
#   bench-feed     the host side of the feed alone (one core) beside the per-sample path and the loader
#   demo           b) `fastcd demo` on the GPU, Fashion-MNIST from .gpu-data/: time and top-1 per row
#   kernel-tests   c) the Triton kernels (CD, GKD, crop) against their float64 references, on CUDA tensors,
#                  while the CUDA C++ extension builds in the background
#   cuda-ext       the CUDA C++ extension's test (reusing that build)
#   bench-kernels  eager vs torch.compile vs Triton vs CUDA C++, ResNet-18/34 stage shapes, both layouts
#   bench-train    the step ablation, on-device data
#   bench-loader   ImageFolder/PIL vs the torch backend's GPU decode, on the same JPEGs
# Outputs, under --out (default $OUT, else a new temporary folder), at most 8 files, rewritten after
# every step so a later failure or timeout loses nothing: summary.txt, steps.jsonl (one JSON line per
# step), results.tar.gz (the benchmarks' JSON, markdown and PNG files, the demo's table), logs.tar.gz
# (one log per step).
# --dry-run: the same steps at tiny sizes on the CPU, imitating the GPU image (fastcd imported only the
# way this script installs it, ffcv and nvidia.dali unimportable); tests/test_gpu_suite.py runs it.
# Environment: PYTHON (default python3), TOTAL seconds (default 470; dry run 600).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

DRY=0 STAGE=0
OUTDIR=${OUT:-}
ONLY=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --out) OUTDIR=${2:?--out needs a folder}; shift ;;
    --only) ONLY=${2:?--only needs step names}; shift ;;
    --stage-data) STAGE=1 ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_suite: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
FMNIST_SYSTEM=/usr/share/datasets/fashion-mnist FMNIST=$ROOT/.gpu-data/fashion-mnist
if [ $STAGE = 1 ]; then  # the idx files travel to the GPU machine in this ignored folder (the call's carry)
  [ -d "$FMNIST_SYSTEM" ] || { echo "gpu_suite: $FMNIST_SYSTEM is missing: apt-get install dataset-fashion-mnist" >&2; exit 2; }
  mkdir -p "$FMNIST" && cp -L "$FMNIST_SYSTEM"/*-idx*-ubyte* "$FMNIST"/ && du -sh "$FMNIST" && exit 0
  exit 2
fi
[ $DRY = 1 ] && [ ! -d "$FMNIST" ] && FMNIST=$FMNIST_SYSTEM  # the CPU machines have the Debian package
PYTHON=${PYTHON:-python3}
TOTAL=${TOTAL:-$([ $DRY = 1 ] && echo 600 || echo 470)}
[ -n "$OUTDIR" ] || OUTDIR=$(mktemp -d -t fastcd-gpu-suite.XXXX)
mkdir -p "$OUTDIR" 2>/dev/null && [ -w "$OUTDIR" ] || { echo "gpu_suite: cannot write to --out $OUTDIR" >&2; exit 2; }
OUTDIR=$(cd "$OUTDIR" && pwd)
W=$(mktemp -d -t fastcd-gpu-work.XXXX)  # venv, logs, results and data; only OUTDIR comes back
BUILD_PID="" DATA_PID=""
trap 'kill $BUILD_PID $DATA_PID 2>/dev/null; rm -rf "$W"' EXIT
LOGS=$W/logs RESULTS=$W/results DATA=$W/data
mkdir -p "$LOGS" "$RESULTS"
VPY=$W/venv/bin/python
FASTCD=$W/venv/bin/fastcd
START=$(date +%s)
: >"$OUTDIR/steps.jsonl"
rm -f "$OUTDIR/summary.txt" "$OUTDIR/results.tar.gz" "$OUTDIR/logs.tar.gz"
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=$W/ext
if [ $DRY = 1 ]; then  # one OpenMP thread: on a shared small CPU, competing thread pools slow all down many times
  export TRITON_INTERPRET=1 TMPDIR=$W OMP_NUM_THREADS=1
else
  export FASTCD_CUDA_JIT=1  # the benchmarks reuse the background build
fi

CONFIG=configs/imagenet/s_resnet18.t_resnet34.cd.kdv2.lrdv2.yaml
if [ $DRY = 1 ]; then
  TINY=(--set student.width=0.0625 --set teacher.width=0.0625 --set data.res=32 --set data.val_res=32
        --set data.batch_size=8 --set data.workers=2 --set data.train_subset=256)
  KERNELS=(--cpu) TRAIN=("${TINY[@]}" --steps 3 --warmup 1 --skip torch.compile) IMAGES=48 WORKERS=2
  FED=("${TINY[@]}" --steps 3 --warmup 1) FEED=(--batch 8 --res 32 --repeats 1 --epochs 1)
  LOADER=(--res 32 --batch 8 --epochs 1)
  DEMO=(--seeds 2 --epochs 1 --teacher-epochs 1 --train-subset 256 --set data.val_subset=512)
else  # 16384 images: an epoch is 64 steps of 256, so the fed rows cross an epoch boundary
  KERNELS=() TRAIN=(--set data.res=176 --set data.val_res=176 --steps 25 --warmup 8) IMAGES=16384 WORKERS=16
  FED=(--set data.res=176 --set data.val_res=176 --steps 60 --warmup 12)
  FEED=(--batch 256 --res 176 --repeats 3 --epochs 1)
  LOADER=(--res 176 --batch 256 --epochs 2)
  DEMO=()
fi

pack() {  # the results and logs so far into OUTDIR, atomically
  tar -czf "$OUTDIR/.results.tmp" -C "$W" results && mv -f "$OUTDIR/.results.tmp" "$OUTDIR/results.tar.gz"
  tar -czf "$OUTDIR/.logs.tmp" -C "$W" logs && mv -f "$OUTDIR/.logs.tmp" "$OUTDIR/logs.tar.gz"
}

summary() {  # summary.txt from steps.jsonl (rewritten after every step)
  "$PYTHON" - "$OUTDIR" "$TOTAL" "$(( $(date +%s) - START ))" <<'EOF' >"$OUTDIR/.summary.tmp"
import json, sys
out, total, spent = sys.argv[1], sys.argv[2], sys.argv[3]
print(f"fastcd gpu_suite: {spent}s of {total}s")
for line in open(f"{out}/steps.jsonl"):
    s = json.loads(line)
    print(f"{s['step']:<20} {s['status']:<10} {s['seconds']:>4}s  {s['last_line']}")
EOF
  mv -f "$OUTDIR/.summary.tmp" "$OUTDIR/summary.txt"
}

record() {  # record NAME STATUS RC SECONDS: one line in steps.jsonl, then pack and summarise
  "$PYTHON" - "$@" "$LOGS/$1.log" >>"$OUTDIR/steps.jsonl" <<'EOF'
import json, sys
name, status, rc, seconds, log = sys.argv[1:6]
lines = [l.strip() for l in open(log, errors="replace") if l.strip()]
print(json.dumps({"step": name, "status": status, "rc": int(rc), "seconds": int(seconds),
                  "last_line": lines[-1][:300] if lines else ""}))
EOF
  pack
  summary
}

FAILED=0
# step NAME BUDGET COMMAND...: run COMMAND under `timeout` (SIGINT first, so benchmarks keep the rows done)
step() {
  local name=$1 budget=$2
  shift 2
  if [ -n "$ONLY" ] && [[ ",install,env,$ONLY," != *",$name,"* ]]; then return 0; fi
  local left=$(( TOTAL - ($(date +%s) - START) )) t0 rc status
  t0=$(date +%s)
  if (( left < budget / 2 )); then
    echo "skipped: needs ~${budget}s, ${left}s left of TOTAL=${TOTAL}" >"$LOGS/$name.log"
    status=skipped rc=0
  else
    (( budget > left )) && budget=$left
    echo "== $name (budget ${budget}s)"
    timeout --signal=INT --kill-after=15 "$budget" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    case $rc in 0) status=ok ;; 124 | 137) status=timed_out ;; *) status=failed ;; esac
  fi
  [ "$status" = ok ] || FAILED=1
  echo "   $status ($(( $(date +%s) - t0 ))s): $(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | cut -c1-200)"
  record "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))"
}

install_fastcd() {  # fastcd into $W/venv: python3's packages plus an editable, offline, dependency-free install
  "$PYTHON" -m venv --without-pip "$W/venv" || return 1
  local site
  site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
  "$PYTHON" -c 'import site; print("\n".join([*site.getsitepackages(), site.getusersitepackages()]))' \
    >"$site/_fastcd_parent.pth" || return 1
  if [ $DRY = 1 ]; then  # the GPU image has neither library: make both unimportable here too
    mkdir -p "$W/blocked/ffcv" "$W/blocked/nvidia/dali"
    echo 'raise ImportError("ffcv is not installed (gpu_suite --dry-run imitates the GPU image)")' \
      >"$W/blocked/ffcv/__init__.py"
    echo 'raise ImportError("nvidia.dali is not installed (gpu_suite --dry-run imitates the GPU image)")' \
      >"$W/blocked/nvidia/dali/__init__.py"
    # `nvidia` holds other packages (CUDA libraries): this one comes first and extends its path to theirs
    echo 'import pkgutil; __path__ = pkgutil.extend_path(__path__, __name__)' >"$W/blocked/nvidia/__init__.py"
    echo "$W/blocked" >"$site/_0_blocked.pth"  # .pth files are read in name order: before the parent's
  fi
  "$VPY" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation --no-index \
    --ignore-installed -e "$ROOT" || return 1
  "$VPY" -c 'import fastcd.kernels, fastcd.bench, fastcd.data_prep; print("fastcd importable from", fastcd.__file__)'
}

build_cuda_ext() {  # the CUDA C++ extension, JIT-compiled into TORCH_EXTENSIONS_DIR (the tests reuse it)
  "$VPY" -c 'from fastcd.kernels.cd_cuda import load_jit; load_jit(); print("CUDA extension built")'
}

export -f install_fastcd  # `timeout` runs programs: the function runs in `bash -c`
export PYTHON W VPY DRY ROOT
step install 90 bash -c install_fastcd
if ! grep -q '"step": "install", "status": "ok"' "$OUTDIR/steps.jsonl"; then
  echo "gpu_suite: fastcd could not be installed (logs.tar.gz: logs/install.log); stopping" >&2
  exit 2
fi
step env 60 "$VPY" -m fastcd.bench.gpu_check $([ $DRY = 1 ] && echo --cpu)
if ! grep -q '"step": "env", "status": "ok"' "$OUTDIR/steps.jsonl"; then
  echo "gpu_suite: $(tail -n 1 "$LOGS/env.log"); stopping" >&2
  exit 2
fi

# The JPEGs of the fed step are generated and prepared (shards only: no ffcv here) in the background on
# all cores while nothing else runs; the CUDA C++ extension builds beside them (used by cuda-ext, later).
(exec nice -n 5 "$VPY" -c "import sys; from pathlib import Path; from fastcd.bench.prepare import generated_dataset
generated_dataset(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))" "$DATA" "$IMAGES" "$WORKERS" \
  >"$LOGS/data-prep.log" 2>&1) &  # exec: DATA_PID is the Python process itself, so a kill reaches it
DATA_PID=$!
if [ $DRY = 1 ]; then  # the dry run proves the plumbing; compiling for sm_90 here takes minutes
  EXT_TEST=(-k hopper)
else
  EXT_TEST=()
  build_cuda_ext >"$LOGS/cuda-ext-build.log" 2>&1 &
  BUILD_PID=$!
fi

# a) the fed step against the on-device step (waits, bounded by its budget, for the data first)
step train-fed 220 bash -c "while kill -0 $DATA_PID 2>/dev/null; do sleep 1; done
  tail -n 3 '$LOGS/data-prep.log'
  exec '$FASTCD' bench train '$CONFIG' --data loader --feed --data-path '$DATA' --images $IMAGES ${FED[*]} --out '$RESULTS'"
step bench-feed 90 "$FASTCD" bench feed "$DATA" --images "$IMAGES" "${FEED[@]}" --out "$RESULTS"
# b) time to accuracy: the demo on this machine, on the Fashion-MNIST that travelled with the tree
step demo 120 bash -c "[ -d '$FMNIST' ] || { echo 'skipped: no $FMNIST (run bash bench/gpu_suite.sh --stage-data and carry .gpu-data)'; exit 1; }
  '$FASTCD' demo --force --out '$W/demo' ${DEMO[*]} --set data.path='$FMNIST' || exit 1
  mkdir -p '$RESULTS/demo' && cp '$W'/demo/*.md '$RESULTS/demo/'"
# c) kernels and the step ablation, last
PYTEST=("$VPY" -m pytest -o addopts="" -q -p no:cacheprovider)  # last line: "N passed in S s"
step kernel-tests 120 "${PYTEST[@]}" -x -m "not slow" \
  tests/test_kernels_cd.py tests/test_kernels_gkd.py tests/test_kernels_crop.py
step cuda-ext 90 bash -c "while [ -n '$BUILD_PID' ] && kill -0 '$BUILD_PID' 2>/dev/null; do sleep 1; done
  cat '$LOGS/cuda-ext-build.log' 2>/dev/null
  exec ${PYTEST[*]} -m slow tests/test_cuda_ext.py ${EXT_TEST[*]}"
step bench-kernels 80 "$FASTCD" bench kernels "${KERNELS[@]}" --out "$RESULTS"
step bench-train 170 "$FASTCD" bench train "$CONFIG" --ablation "${TRAIN[@]}" --out "$RESULTS"
step bench-loader 70 "$FASTCD" bench loader "$DATA" --backends imagefolder,torch --workers "$WORKERS" \
  --images "$IMAGES" "${LOADER[@]}" --out "$RESULTS"

kill $BUILD_PID $DATA_PID 2>/dev/null  # a build or data job the steps no longer wait for
pack
summary
echo
cat "$OUTDIR/summary.txt"
grep -h "knob that bought the most" "$LOGS"/bench-train*.log 2>/dev/null
echo "outputs: $OUTDIR ($(ls "$OUTDIR" | tr '\n' ' '))"
exit $FAILED
