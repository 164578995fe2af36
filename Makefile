# make demo: venv + build + the main job on synthetic data.  make test: venv + test extras + pytest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=

.PHONY: demo test bench inplace clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Idle OpenMP threads sleep instead of spinning, and BLAS calls stay single-threaded inside
# the kernels' own OpenMP threads: on a busy machine spinning threads steal the cores the
# working ones need (about 2x on two shared cores). Either can be overridden from the shell.
demo: $(PY)
	$(PY) -m pip install -q .
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} OPENBLAS_NUM_THREADS=$${OPENBLAS_NUM_THREADS:-1} \
	  $(VENV)/bin/lfads-fast demo $(DEMO_ARGS)

test: $(PY)
	$(PY) -m pip install -q ".[test]"
	cd tests && ../$(PY) -m pytest -q -rs -p no:cacheprovider .

# The CPU benchmark suite (bounded: ~30 min on 2 cores); on a machine with a GPU,
# bench/gpu_check.sh runs the GPU part.
bench: $(PY)
	$(PY) -m pip install -q ".[bench]"
	$(PY) bench/bench_step.py
	$(PY) bench/bench_frameworks.py
	$(PY) bench/bench_fixed_points.py
	$(PY) bench/bench_sparse.py

# Development: build the extension modules into lfads_fast/ of this checkout (no install),
# with the build tools of $(PY); then PYTHONPATH=. runs the tests against the working tree.
# PY may be a path or a name on PATH (make inplace PY=python3): CMake gets the interpreter's
# own sys.executable. CMAKE_ARGS adds options (e.g. -DCMAKE_CUDA_ARCHITECTURES=90).
inplace:
	$(PY) -c "import pybind11, scipy_openblas32" 2>/dev/null || $(PY) -m pip install -q pybind11 scipy-openblas32 cmake ninja numpy
	$(PY) -m cmake -S . -B build/inplace -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DPython_EXECUTABLE=$$($(PY) -c 'import sys; print(sys.executable)') \
	  -Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir) \
	  -DLFADS_FAST_CUDA=$${LFADS_FAST_CUDA:-OFF} $${CMAKE_ARGS:-} >/dev/null
	$(PY) -m cmake --build build/inplace -j$${JOBS:-2}
	cp build/inplace/_cpu*.so lfads_fast/
	if ls build/inplace/_cuda*.so >/dev/null 2>&1; then cp build/inplace/_cuda*.so lfads_fast/; fi
	$(PY) -m cmake --install build/inplace --component realtime --prefix . >/dev/null

clean:
	rm -rf build lfads_fast/_cpu*.so lfads_fast/_cuda*.so lfads_fast/lib lfads_fast/include
