#!/usr/bin/env bash
# Builds the CUDA module, runs the GPU tests, a race check of the persistent kernels and the
# kernel benchmark, in one go (one call on a lent GPU machine). Logs and the benchmark table go
# to OUT_DIR (default: $OUT if set, else bench/results).
#   bench/gpu_check.sh [OUT_DIR]
# scipy-openblas32 (needed to build and import the CPU module) is installed from .whl/ when
# wheels are there; other needs (nvcc, cmake, ninja, pybind11, numpy, cupy, pytest, torch) are
# expected on the machine.
set -uo pipefail
out=${1:-${OUT:-bench/results}}
mkdir -p "$out"
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/lfads_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/lfads_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv || true

LFADS_FAST_CUDA=ON make inplace PY="$PY" >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
tail -2 "$out/build.log"

"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda.py >"$out/gpu_tests.log" 2>&1
tests=$?
tail -25 "$out/gpu_tests.log"

if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool racecheck --error-exitcode 3 "$PY" -m pytest -q -p no:cacheprovider \
    -m gpu tests/test_cuda.py -k "every_tile and (1 or 8)" >"$out/racecheck.log" 2>&1
  echo "racecheck exit code $? (log: $out/racecheck.log)"
fi

"$PY" bench/bench_gpu_kernels.py --out "$out/gpu_kernels.md" >"$out/bench.log" 2>&1
tail -20 "$out/bench.log"
exit $tests
