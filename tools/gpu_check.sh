#!/usr/bin/env bash
# `make gpu-check` (issue 13, item 4): the GPU path in one prepared run, under 8 minutes.
#
#   bash tools/gpu_check.sh            # on a CUDA machine, after `make export`
#   GPU_CHECK_DRY=1 bash tools/gpu_check.sh   # anywhere: the CPU-side steps only (render, configs)
#
# 1. onnxruntime-gpu (+ numpy<2, onnx) into build/triton/pylib-gpu, the backend stub's import dir
#    for this run (the CPU pylib stays as it is);
# 2. renders three repositories from the exported whisper-base graphs:
#      build/gpu/repo-cuda  CUDAExecutionProvider, fp32 graphs
#      build/gpu/repo-fp16  TensorrtExecutionProvider with trt_fp16_enable (fp16 engines from the
#                           fp32 graphs; CUDA EP takes what TensorRT cannot)
#      build/gpu/repo-trt   TensorrtExecutionProvider, fp32
#    and checks that ONNX Runtime there really offers the providers;
# 3. serves repo-cuda and runs the bench (short: 3-minute recording, 20 calls, ours fp32 on CUDA
#    and the fp16 TensorRT repository; faster-whisper batched on CPU as the reference);
# 4. perf_analyzer against the CUDA encoder and decoder (bench.perf, short sweeps).
# Results: build/gpu/latest.json, build/gpu/perf.json and build/gpu/gpu_check.log.
# Every step has its own time limit; the whole stays under GPU_CHECK_BUDGET_S (default 470 s).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
MODEL_DIR=${MODEL_DIR:-build/models/whisper-base}
OUT=${GPU_CHECK_OUT:-build/gpu}
PYLIB_GPU=${PYLIB_GPU:-build/triton/pylib-gpu}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
DRY=${GPU_CHECK_DRY:-0}
START=$(date +%s)
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
export PYTHONPATH="$ROOT"
say() { echo "[gpu-check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
step() {  # step NAME MAX_SECONDS CMD...: run with min(MAX, time left)
  local name=$1 max=$2; shift 2
  local t; t=$(left); [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -le 5 ]; then say "SKIPPED $name: out of time"; return 124; fi
  say "$name (limit ${t}s): $*"
  timeout "$t" "$@" >>"$LOG" 2>&1
  local rc=$?
  say "$name: exit $rc"
  return $rc
}

if [ ! -f "$MODEL_DIR/model_info.json" ]; then
  say "no export in $MODEL_DIR: run make export first"; exit 2
fi
GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >>"$LOG" 2>&1; then GPU=1; fi
if [ "$GPU" = 0 ] && [ "$DRY" != 1 ]; then
  say "no CUDA GPU here (nvidia-smi finds none): nothing was run on a GPU. GPU_CHECK_DRY=1 runs the CPU-side steps."
  exit 3
fi

# 1. onnxruntime-gpu for the backend stub (numpy < 2: the Python backend needs it)
if [ "$DRY" != 1 ]; then
  if [ ! -f "$PYLIB_GPU/.installed" ]; then
    step "install onnxruntime-gpu" 150 "$PY" -m pip install --quiet --target "$PYLIB_GPU" "numpy<2" onnxruntime-gpu onnx==1.23.2 \
      && touch "$PYLIB_GPU/.installed" || { say "onnxruntime-gpu did not install"; exit 4; }
  fi
  PROVIDERS=$(python3.11 -I -c "import sys; sys.path.insert(0, '$PYLIB_GPU'); import onnxruntime as o; print(','.join(o.get_available_providers()))" 2>>"$LOG")
  say "onnxruntime providers in $PYLIB_GPU: $PROVIDERS"
  case "$PROVIDERS" in *CUDAExecutionProvider*) ;; *) say "CUDAExecutionProvider missing"; exit 4;; esac
else
  PYLIB_GPU=build/triton/pylib
  say "dry run: CPU pylib, configs only"
fi

# 2. the three repositories
render() {  # render NAME PROVIDER [--set ...]
  local name=$1 provider=$2; shift 2
  step "render $name" 60 "$PY" -m model_repository.render -q --model-dir "$MODEL_DIR" --precision fp32 \
    --out "$OUT/repo-$name" --execution-provider "$provider" --pylib-dir "$PYLIB_GPU" "$@"
}
render cuda CUDAExecutionProvider || exit 5
render fp16 TensorrtExecutionProvider --set fp16=true || exit 5
render trt TensorrtExecutionProvider || exit 5
for r in cuda fp16 trt; do
  grep -h 'execution_provider\|"fp16"' "$OUT/repo-$r"/*/config.pbtxt | sed "s/^/  $r: /" | tee -a "$LOG"
done
if [ "$DRY" = 1 ]; then
  say "dry run done: repositories rendered in $OUT (nothing served, nothing run on a GPU)"
  exit 0
fi

# 3. bench on the GPU (short workloads: the budget is 8 minutes in all)
"$PY" -m pip install --quiet -r bench/requirements.txt >>"$LOG" 2>&1
step "bench" 240 "$PY" -m bench.speed --model-dir "$MODEL_DIR" --long-minutes 3 --calls 20 \
  --ours "cuda:fp32:execution_provider=CUDAExecutionProvider,pylib_dir=$ROOT/$PYLIB_GPU" \
  --ours "trt-fp16:fp32:execution_provider=TensorrtExecutionProvider,fp16=true,pylib_dir=$ROOT/$PYLIB_GPU" \
  --peers batched --out "$OUT/latest.json"

# 4. perf_analyzer against the CUDA models
step "perf_analyzer setup" 60 bash tools/setup_perf.sh
step "perf_analyzer" 120 "$PY" -m bench.perf --model-dir "$MODEL_DIR" --execution-provider CUDAExecutionProvider \
  --set "pylib_dir=$ROOT/$PYLIB_GPU" --encoder-sweep 1:4:3 --decoder-sweep 1:8:7 --timeout 100 --out "$OUT/perf.json"
say "done in $(( $(date +%s) - START )) s; results in $OUT (latest.json, perf.json, gpu_check.log)"
