#!/usr/bin/env bash
# GPU checks of the FlashInfer attention path, in one command for the lent GPU machine
# (H100/H200, Python 3.12 at /opt/torch/.venv, torch 2.11+cu130, nvcc 13.0; no internet there).
#
# --- 1. Here, once (a machine with PyPI access), in the repository root: fetch the wheels ------
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     flashinfer-python==0.6.18.post1 apache-tvm-ffi==0.1.15.post2 \
#     msgspec==0.22.0 gguf==0.19.0 pytest-asyncio==1.5.0
#
# Wheels that must be in .whl/ (about 22 MB; keep exactly one version of each):
#   flashinfer-python 0.6.x   the kernels (pure-Python wheel; kernels are JIT-compiled with the
#                             device's nvcc on first use, cached in ~/.cache/flashinfer)
#   apache-tvm-ffi 0.1.x      flashinfer's FFI (>=0.1.6, <0.2, not 0.1.8); cp312 wheel
#   msgspec                   parrot_actors messages (not on the device image)
#   gguf                      parrot_actors model loading (not on the device image)
#   pytest-asyncio            async tests (not on the device image; needs pytest >= 8.4 there)
# Already on the device image (/work/.library/device/KINDS.md), so not carried: torch,
# transformers, accelerate, safetensors, sentencepiece, aiohttp, uvloop, tqdm, numpy, pyyaml,
# requests, pytest, pytest-timeout, hypothesis, matplotlib, ninja, nvidia-ml-py (pynvml),
# einops, tabulate, click, packaging, filelock, typing-extensions.
# flashinfer-python also declares cuda-python, cuda-tile, nccl4py, nvidia-cudnn-frontend and
# nvidia-cutlass-dsl: they are imported lazily by features this project does not use (cuDNN,
# CuTe-DSL, communication kernels); `import flashinfer` and the fa2/fa3 paged prefill, decode
# and cascade wrappers need none of them, so they are left out (nvidia-cutlass-dsl alone is
# larger than the 64 MiB the device tool carries).
#
# --- 2. On the device (the `run` tool): -----------------------------------------------------
#
#   run(command="bash scripts/gpu_check.sh tests", carry=[".whl"], timeout_s=600)
#   run(command="bash scripts/gpu_check.sh bench", carry=[".whl"], timeout_s=600)
#   run(command="bash scripts/gpu_check.sh steptime", carry=[".whl"], timeout_s=600)
#   Argument: all (default) | tests | bench | steptime. On a fresh machine FlashInfer JIT-compiles its
#   kernels first (minutes), so "tests" and "bench" in two calls is the safe split; "all" fits
#   one call only when compiles are fast. Each phase is bounded by PREWARM_TIMEOUT /
#   TEST_TIMEOUT / BENCH_TIMEOUT (defaults 300 / 400 / 400 s) and by DEADLINE (default 570 s
#   for the whole script, under the tool's 600 s), so the logs come back even when it runs long.
#
# "steptime" (also part of "all") measures the step-time model's error on this GPU: a real engine
# (random Llama-2-7B-shaped weights, 8 of its 32 layers, bf16) runs the mixed calibration
# workload of benchmarks/step_time_calibration.py; every step's shape and measured time are
# compared with the h100 step-time model of the same 8-layer shape (nothing fitted), and the
# linear model is fitted to the GPU too. On an H200 the h100 model is the nearest: it should
# over-predict memory-bound steps (4.8 vs 3.35 TB/s).
#
# Writes to $OUT (./out when OUT is unset): gpu_env.log, gpu_tests.log, gpu_bench.log,
# gpu_attention.json, gpu_attention.png, gpu_steptime.log, gpu_steptime.json. Exit status: 0
# only if every phase run passed.

set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
MODE="${1:-all}"
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-16}"  # parallel nvcc jobs of FlashInfer's JIT
DEADLINE="${DEADLINE:-570}"
budget() {  # min($1, seconds left before DEADLINE), at least 10
  local left=$((DEADLINE - SECONDS))
  ((left < 10)) && left=10
  if (($1 < left)); then echo "$1"; else echo "$left"; fi
}

if ! ls .whl/*.whl >/dev/null 2>&1; then
  echo "no wheels in .whl/: see the download command at the top of $0" | tee "$OUT/gpu_env.log"
  exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvcc --version | tail -n 2
  python3 - <<'EOF'
import sys

import torch

print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
import flashinfer

print("flashinfer", flashinfer.__version__, "device", torch.cuda.get_device_name())
EOF
  python3 -m pytest --version
} 2>&1 | tee "$OUT/gpu_env.log"

# FlashInfer JIT-compiles each kernel module (dtype x head_dim x backend) with nvcc on first use;
# the Hopper fa3 prefill modules take minutes each. Build all modules a phase needs at once
# (one thread each, PREWARM_JOBS nvcc jobs per module) so the 16 cores stay busy; later phases
# load them from ~/.cache/flashinfer. Configs: "q_heads,kv_heads,head_dim,dtype".
TEST_CONFIGS="32,8,128,bfloat16 9,3,64,bfloat16 32,32,128,bfloat16 32,8,128,float16 8,2,64,bfloat16"
case "$MODE" in
  all | tests) CONFIGS="$TEST_CONFIGS" ;;
  bench | steptime) CONFIGS="32,32,128,bfloat16" ;;
  *) echo "unknown mode $MODE: all | tests | bench | steptime"; exit 2 ;;
esac
# shellcheck disable=SC2086  # CONFIGS is a list
MAX_JOBS="${PREWARM_JOBS:-4}" timeout "$(budget "${PREWARM_TIMEOUT:-300}")" \
  python3 benchmarks/gpu_attention.py --prewarm $CONFIGS 2>&1 | tee -a "$OUT/gpu_env.log"

rc=0
if [[ "$MODE" == all || "$MODE" == tests ]]; then
  # pipefail: a pipeline's status is pytest's (or timeout's 124), not tee's.
  timeout "$(budget "${TEST_TIMEOUT:-400}")" \
    python3 -m pytest -p no:cacheprovider -m gpu -v -rA 2>&1 | tee "$OUT/gpu_tests.log" || rc=1
  timeout "$(budget 120)" python3 -m pytest -p no:cacheprovider -q \
    tests/test_flashinfer_index.py 2>&1 | tee -a "$OUT/gpu_tests.log" || rc=1
fi
if [[ "$MODE" == all || "$MODE" == bench ]]; then
  timeout "$(budget "${BENCH_TIMEOUT:-400}")" python3 benchmarks/gpu_attention.py --out "$OUT" \
    2>&1 | tee "$OUT/gpu_bench.log" || rc=1
fi
if [[ "$MODE" == all || "$MODE" == steptime ]]; then
  SHAPE='{"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 8,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 49152}'
  timeout "$(budget "${STEPTIME_TIMEOUT:-300}")" python3 benchmarks/step_time_calibration.py \
    --device cuda --dtype bfloat16 --random-model "$SHAPE" --predict-gpu h100 --requests 48 \
    --out "$OUT/gpu_step_fit.json" --json "$OUT/gpu_steptime.json" 2>&1 \
    | tee "$OUT/gpu_steptime.log" || rc=1
fi
echo "gpu_check.sh ($MODE): exit $rc" | tee -a "$OUT/gpu_env.log"
exit "$rc"
