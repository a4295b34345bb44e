#!/usr/bin/env bash
# GPU check of the Triton kernels, in one call (under 10 minutes on one H200: the steps are limited
# to 240 s and 330 s).
#
#   bash kernels/gpu_check.sh            # from the repository root, on a machine with CUDA, torch and triton
#
# 1. the kernel tests compiled for the GPU (pytest; TRITON_INTERPRET is unset so nothing is interpreted);
# 2. the benchmark: Triton kernel vs dense SDPA (flash) vs compiled FlexAttention, 16k/32k/75k tokens,
#    densities 0.1/0.25/0.5, block sizes 64 and 128, B=1, H=24, D=128, bf16 (python -m vidsparse.kernels.bench_gpu).
#
# A dry run of the script's mechanics on a CPU machine: BENCH_ARGS=--smoke OUT=/tmp/gpu_check bash kernels/gpu_check.sh
# Results go to $OUT (when set) or samples/bench/: gpu_env.txt, gpu_pytest.log, bench_gpu.json, bench_gpu.log.
# vidsparse is imported from a staged copy (the package-dir mapping of pyproject.toml, done by hand), so the check
# needs neither pip nor vidsparse's other dependencies (diffusers, ...) on the GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
RESULTS="${OUT:-samples/bench}"
mkdir -p "$RESULTS"

STAGE="$(mktemp -d)"
cp -r vidsparse "$STAGE/vidsparse"
for sub in kernels pipelines eval; do
  [ -d "$sub" ] && rm -rf "$STAGE/vidsparse/$sub" && cp -r "$sub" "$STAGE/vidsparse/$sub"
done
# PYTHONSAFEPATH: the repository root must not shadow the staged package (its vidsparse/ lacks vidsparse.kernels).
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PY" -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"); print('triton', triton.__version__)"
  "$PY" -c "import vidsparse.kernels as k; print('vidsparse.kernels from', k.__file__, '| triton available:', \
k.triton_available(), '| auto ->', k.resolve_backend('auto', __import__('torch').device('cuda')))"
} 2>&1 | tee "$RESULTS/gpu_env.txt"

timeout 240 "$PY" -m pytest -q --rootdir=. \
  tests/test_triton_kernel.py tests/test_planning_kernels.py tests/test_bench_gpu.py 2>&1 | tee "$RESULTS/gpu_pytest.log"
rc_tests=${PIPESTATUS[0]}

# shellcheck disable=SC2086  # BENCH_ARGS is a list of options, split on purpose
timeout 330 "$PY" -m vidsparse.kernels.bench_gpu --json "$RESULTS/bench_gpu.json" ${BENCH_ARGS:-} 2>&1 \
  | tee "$RESULTS/bench_gpu.log"
rc_bench=${PIPESTATUS[0]}

rm -rf "$STAGE"
echo "gpu_check: tests rc=$rc_tests, bench rc=$rc_bench (124 = timed out)"
[ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ]
