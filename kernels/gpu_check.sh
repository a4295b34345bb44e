#!/usr/bin/env bash
# GPU check of the Triton kernels, in one call, for a bare GPU machine (see ../shared/notes/gpu-machine.md): at most
# 5.9 minutes of steps on one H200 (pytest 90 s, benchmark 200 s by its own budget, end to end 60 s), so a 10-minute
# command has room for start-up and one rerun.
#
#   bash kernels/gpu_check.sh             # from the repository root, on a machine with CUDA, torch and triton
#   bash kernels/gpu_check.sh --smoke     # anywhere: a tiny version of every step, the kernel interpreted on CPU
#
# Steps (results in $OUT when set, else samples/bench/):
# 0. gpu_env.txt: Python, torch, Triton, CUDA, GPU name and driver, whether diffusers imports, what `auto` picks;
# 1. gpu_pytest.log: the kernel tests compiled for the GPU (TRITON_INTERPRET is unset: nothing is interpreted);
#    --smoke: collection only (the CPU suite runs these tests itself, interpreted);
# 2. bench_gpu.json / bench_gpu.log: python -m vidsparse.kernels.bench_gpu (dense SDPA flash, cuDNN SDPA and compiled
#    FlexAttention vs the Triton kernel on every method's plan, Wan 1.3B and HunyuanVideo head shapes, 32 760 and
#    75 600 tokens, bf16); its own time budget skips what does not fit and says so in the JSON;
# 3. gpu_e2e.log: only when diffusers imports: the Wan integration tests (a tiny transformer with vidsparse applied).
#
# vidsparse is imported from the checkout (PYTHONPATH, no pip install), and steps 0-2 need only torch and triton (and
# pytest): vidsparse's diffusers integration loads lazily, on first use.
#
# Carrying diffusers for step 3 (the GPU machine has no diffusers and no network; pure-Python wheels can be carried in
# the git-ignored wheels/ folder of the working tree):
#   here:  pip download diffusers --no-deps -d wheels/        # one pure-Python wheel, a few MB
#   there: this script installs it: pip install --no-index --find-links wheels/ --no-deps --target <tmp> wheels/*.whl
# (diffusers' own requirements — huggingface_hub, safetensors, numpy, Pillow, regex, requests — must already be there.)
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (allowed: --smoke)" >&2; exit 2 ;;
  esac
done
export PYTHONUNBUFFERED=1
if [ "$SMOKE" -eq 1 ]; then
  # The interpreter must be chosen before triton is first imported (bench_gpu.py checks that it was).
  export TRITON_INTERPRET=1
else
  unset TRITON_INTERPRET
fi
PY="${PYTHON:-python3}"
RESULTS="${OUT:-samples/bench}"
mkdir -p "$RESULTS"

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
SITE="$STAGE/site"
if [ -d wheels ] && ls wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --find-links wheels/ --no-deps --target "$SITE" wheels/*.whl 2>&1 | tail -3
fi
# vidsparse from this checkout, without installing it: vidsparse/__init__.py maps vidsparse.kernels / .pipelines /
# .eval to the top-level folders (pyproject.toml's package-dir, done at import time).
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "gpu_check.sh $* ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "nvidia-smi: not available"
  # A quoted here-document: no shell quoting inside the Python code.
  "$PY" - <<'EOF' 2>&1
import platform
import subprocess
import sys

import torch

print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "| CUDA (build)", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
try:
    import triton

    print("triton", triton.__version__)
except Exception as exc:  # recorded, not fatal: the later steps say what fails
    print("triton: not importable:", repr(exc))
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print("gpu", torch.cuda.get_device_name(0), "| capability", props.major, props.minor, "| SMs", props.multi_processor_count,
          "| memory GiB", round(props.total_memory / 2**30, 1))
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:
        driver = f"unknown ({exc!r})"
    print("driver", driver)
else:
    print("gpu: no CUDA device")
try:
    import diffusers

    print("diffusers", diffusers.__version__)
except ImportError:
    print("diffusers: not installed (step 3 is skipped; see the header of kernels/gpu_check.sh to carry it)")
import vidsparse.kernels.dispatch as dispatch

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print("vidsparse.kernels from", dispatch.__file__, "| triton available:", dispatch.triton_available(),
      "| auto ->", dispatch.resolve_backend("auto", device, torch.bfloat16))
EOF
} 2>&1 | tee "$RESULTS/gpu_env.txt"
rc_env=${PIPESTATUS[0]}

PYTEST=("$PY" -m pytest -q --rootdir=. -p no:cacheprovider
  tests/test_triton_kernel.py tests/test_planning_kernels.py tests/test_bench_gpu.py tests/test_gpu_check.py)
if [ "$SMOKE" -eq 1 ]; then PYTEST+=(--collect-only); fi
timeout 90 "${PYTEST[@]}" 2>&1 | tee "$RESULTS/gpu_pytest.log"
rc_tests=${PIPESTATUS[0]}

BENCH=("$PY" -m vidsparse.kernels.bench_gpu --json "$RESULTS/bench_gpu.json" --budget-s 200)
if [ "$SMOKE" -eq 1 ]; then BENCH+=(--smoke); fi
timeout 240 "${BENCH[@]}" 2>&1 | tee "$RESULTS/bench_gpu.log"
rc_bench=${PIPESTATUS[0]}

rc_e2e=skipped
# Not in --smoke: the CPU suite runs these tests itself (and they take minutes interpreted on 2 cores).
if [ "$SMOKE" -eq 0 ] && "$PY" -c "import diffusers" >/dev/null 2>&1; then
  timeout 60 "$PY" -m pytest -q --rootdir=. -p no:cacheprovider tests/test_wan_integration.py 2>&1 \
    | tee "$RESULTS/gpu_e2e.log"
  rc_e2e=${PIPESTATUS[0]}
fi

echo "gpu_check: env rc=$rc_env, tests rc=$rc_tests, bench rc=$rc_bench, e2e rc=$rc_e2e (124 = timed out)"
[ "$rc_env" -eq 0 ] && [ "$rc_tests" -eq 0 ] && [ "$rc_bench" -eq 0 ] && { [ "$rc_e2e" = skipped ] || [ "$rc_e2e" -eq 0 ]; }
