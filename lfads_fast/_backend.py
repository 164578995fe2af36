"""Loading of the compiled modules. Only lfads_fast.ops imports from here."""
from __future__ import annotations

import ctypes
import os
import platform

_cuda_module = None
_cuda_error: str | None = None


def _preload_openblas() -> None:
    # The CPU module links libscipy_openblas from the scipy-openblas32 wheel; loading it first
    # makes the import independent of where pip put the two packages.
    import scipy_openblas32

    lib = os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(True))
    ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)


def _check_cpu(mod) -> None:
    if not getattr(mod, "x86_v3", False) or platform.machine().lower() not in ("x86_64", "amd64"):
        return
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return
    if " avx2" not in flags or " fma" not in flags:
        raise ImportError(
            "lfads_fast was built for x86-64-v3 (AVX2 + FMA) but this CPU lacks them; rebuild "
            "with CMAKE_ARGS='-DLFADS_FAST_X86_LEVEL=baseline' pip install ."
        )


def _default_wait_policy() -> None:
    # Idle OpenMP threads of the kernels sleep instead of spinning unless the user chose
    # otherwise: read once, when the OpenMP runtime loads with the CPU module. On a machine
    # whose cores other work also uses, spinning threads take the cores the working ones
    # need (steps about twice as slow on two shared cores); on an idle machine the two
    # policies measured the same (docs/performance.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_default_wait_policy()
_preload_openblas()
from . import _cpu as cpu  # noqa: E402

_check_cpu(cpu)


def cuda():
    """The CUDA module, imported on first use; raises with the reason when unavailable."""
    global _cuda_module, _cuda_error
    if _cuda_module is None and _cuda_error is None:
        try:
            from . import _cuda as mod

            _cuda_module = mod
        except ImportError as e:  # not built, or no driver
            _cuda_error = str(e)
    if _cuda_module is None:
        raise RuntimeError(f"lfads_fast._cuda is not available: {_cuda_error}")
    return _cuda_module
