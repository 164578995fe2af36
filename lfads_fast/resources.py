"""Memory a run will need, estimated before it allocates, against what the machine has.

The estimates are deliberately rough (within a small factor): they exist to refuse, with a
clear message, a file or configuration that would need far more memory than the machine
has (a small checkpoint declaring a huge generator, a compressed HDF5 file declaring tens of
gigabytes), instead of a MemoryError deep inside the work or the kernel's OOM killer.
"""
from __future__ import annotations

import os

__all__ = [
    "InsufficientMemoryError",
    "available_memory",
    "check_memory",
    "model_bytes",
    "step_bytes",
    "format_bytes",
]

# The check refuses only what clearly cannot fit: estimates above this share of the
# available memory.
HEADROOM = 1.0


class InsufficientMemoryError(ValueError):
    """A run would need more memory than the machine has (estimated before allocating)."""


def available_memory() -> int | None:
    """Bytes this process may still allocate: the smaller of the system's available memory
    and the cgroup's remaining limit (containers); None when neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                used = int(f.read().strip())
            # The page cache counts as used but is given back on demand.
            with open("/sys/fs/cgroup/memory.stat") as f:
                stat = dict(line.split() for line in f if line.count(" ") == 1)
            used -= int(stat.get("inactive_file", 0)) + int(stat.get("active_file", 0))
            found.append(max(int(limit) - max(used, 0), 0))
    except (OSError, ValueError):
        pass
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return min(found) if found else None


def check_memory(needed: float, what: str) -> None:
    """Raises InsufficientMemoryError when needed bytes clearly exceed the available memory.

    Args:
        needed: estimated bytes.
        what: the thing that needs them, named in the message (a file, a configuration).
    """
    have = available_memory()
    if have is not None and needed > HEADROOM * have:
        raise InsufficientMemoryError(
            f"{what} needs about {format_bytes(needed)} of memory, but this machine has "
            f"{format_bytes(have)} available")


def model_bytes(n_params: int, itemsize: int = 4, copies: int = 1) -> int:
    """Bytes of copies of a flat parameter vector (training holds 4: parameters, gradient and
    Adam's two moments)."""
    return int(n_params) * int(itemsize) * int(copies)


def step_bytes(cfg, batch: int, itemsize: int = 4) -> int:
    """Rough bytes of the activations and scratch of one forward/backward pass of a batch of
    trials (time-major states and gates of every recurrence, read-out and its gradients)."""
    T = cfg.recon_seq_len
    enc = 2 * 4 * cfg.ic_enc_dim + 2 * 4 * cfg.ci_enc_dim
    dec = 4 * cfg.con_dim + 4 * cfg.gen_dim + 3 * cfg.fac_dim + 5 * cfg.co_dim
    neurons = max(cfg.recon_data_dim, max(cfg.session_recon_neurons or [0]))
    per_bin = enc + dec + 4 * neurons + 2 * cfg.encod_data_dim + cfg.ext_input_dim
    # Backward keeps about as much again (gradients of the states, work buffers).
    return 2 * int(T) * int(batch) * int(per_bin) * int(itemsize)


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
