#!/usr/bin/env bash
# The GPU check, in one go on a fresh GPU machine without network (under 10 minutes on an H100):
# build the CUDA module for the one architecture present, run the GPU tests (pytest -m gpu),
# compute-sanitizer memcheck on odd sizes and racecheck on the persistent kernels, then the
# benchmarks with bounded repeats. Everything goes to OUT_DIR; a one-screen summary ends it
# (also OUT_DIR/summary.txt).
#
#   bash bench/gpu_check.sh OUT_DIR [WHEEL_DIR]
#
# Run from the repository root. The interpreter is PY (default: python3 from PATH). WHEEL_DIR
# holds wheels installed offline before anything else (pip --no-index --no-deps into
# OUT_DIR/site), e.g. the ones `pip download` gives on a machine with network for:
#   scipy-openblas32 pybind11 cmake ninja numpy h5py pyyaml tqdm pytest cupy-cuda13x torch
# What the machine already has is used as it is. nvcc and the NVIDIA driver must be there.
set -uo pipefail

usage() { echo "usage: bash bench/gpu_check.sh OUT_DIR [WHEEL_DIR]" >&2; exit 64; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
out=$1
wheels=${2:-}
[ -f lfads_fast/ops.py ] || { echo "run from the repository root" >&2; exit 64; }
mkdir -p "$out" || exit 1
out=$(cd "$out" && pwd)
PY=${PY:-python3}
command -v "$PY" >/dev/null || { echo "interpreter '$PY' not found on PATH (set PY=...)" >&2; exit 1; }
start=$(date +%s)
summary=()
note() { summary+=("$1"); echo "== $1"; }
elapsed() { echo "$(( $(date +%s) - start )) s"; }
# Each phase gets its own time limit so that the whole check stays under 10 minutes.
limit() { local s=$1; shift; timeout --signal=INT --kill-after=15 "$s" "$@"; }

# ---------------------------------------------------------------------------- environment
if [ -n "$wheels" ]; then
  ls "$wheels"/*.whl >/dev/null 2>&1 || { echo "no .whl files in $wheels" >&2; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$out/site" "$wheels"/*.whl \
    >"$out/pip.log" 2>&1 || { tail -20 "$out/pip.log"; exit 1; }
  export PYTHONPATH=$out/site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=$out/site/bin:$PATH  # cmake and ninja from their wheels
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv
  nvcc --version | tail -2
  "$PY" -c 'import cupy; print("cupy", cupy.__version__)' 2>&1
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
note "device: ${gpu:-no nvidia-smi}"
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
[ -n "$arch" ] || arch=90

# ---------------------------------------------------------------------------- build (one arch)
t0=$(date +%s)
if LFADS_FAST_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$arch" JOBS=$(nproc) \
    limit 300 make inplace PY="$PY" >"$out/build.log" 2>&1 \
    && "$PY" -c 'from lfads_fast import _backend; _backend.cuda()' >>"$out/build.log" 2>&1; then
  note "build: ok, sm_$arch, $(( $(date +%s) - t0 )) s (build.log)"
else
  tail -40 "$out/build.log"
  note "build: FAILED (build.log)"
  printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
  exit 1
fi

# ---------------------------------------------------------------------------- GPU tests
# The modules with GPU tests (collecting all of tests/ would need every CPU test's imports).
limit 180 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs --junitxml="$out/gpu_tests.xml" \
  tests/test_cuda.py tests/test_gpu_model.py >"$out/gpu_tests.log" 2>&1
tests=$?
tail -15 "$out/gpu_tests.log"
note "pytest -m gpu: exit $tests, $(tail -1 "$out/gpu_tests.log" | tr -d '=') (gpu_tests.log)"
if ! tail -1 "$out/gpu_tests.log" | grep -q passed; then
  note "  WARNING: no GPU test ran (reasons: grep SKIPPED $out/gpu_tests.log)"
  tests=1
fi

# ---------------------------------------------------------------------------- sanitizers
san=0
if command -v compute-sanitizer >/dev/null; then
  # Odd sizes (no multiple of 32, B = 1) through the kernels and through the whole model.
  limit 150 compute-sanitizer --tool memcheck --leak-check full --error-exitcode 3 \
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda.py tests/test_gpu_model.py \
    -k "(gru_matches_cpu and 33) or (gru_matches_cpu and 1-1-7) or decoder_matches_reference \
        or (poisson_elbo and 70) or kl_ic or kl_co or (adam_matches and not 1000003) or odd \
        or bad_arguments" >"$out/memcheck.log" 2>&1
  rc=$?
  note "memcheck: exit $rc, $(grep -c '^========= Invalid\|^========= Program hit' "$out/memcheck.log") errors (memcheck.log)"
  [ $rc -eq 0 ] || san=1
  limit 120 compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 3 \
    "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda.py -k "every_tile" \
    >"$out/racecheck.log" 2>&1
  rc=$?
  note "racecheck: exit $rc, $(grep -c 'Race reported\|hazard' "$out/racecheck.log") hazard lines (racecheck.log)"
  [ $rc -eq 0 ] || san=1
else
  note "compute-sanitizer: not found, memcheck and racecheck skipped"
  san=1
fi

# ---------------------------------------------------------------------------- benchmarks
limit 90 "$PY" bench/bench_gpu_kernels.py --repeats 10 --warmup 2 --out "$out/gpu_kernels.md" \
  >"$out/bench_kernels.log" 2>&1
note "bench_gpu_kernels: exit $?, $(tail -1 "$out/bench_kernels.log" | cut -c1-100) (gpu_kernels.md)"
limit 150 "$PY" bench/bench_step_gpu.py --repeats 10 --out "$out/step_gpu.md" \
  >"$out/bench_step.log" 2>&1
note "bench_step_gpu: exit $?, $(tail -1 "$out/bench_step.log" | cut -c1-100) (step_gpu.md)"
grep '^| nlb5ms' "$out/step_gpu.md" 2>/dev/null | head -4 | while read -r line; do echo "   $line"; done \
  >"$out/.rows"
while IFS= read -r line; do summary+=("$line"); done <"$out/.rows"
rm -f "$out/.rows"

note "total: $(elapsed); results in $out"
echo
echo "==================== GPU check summary ===================="
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
[ $tests -eq 0 ] && [ $san -eq 0 ]
