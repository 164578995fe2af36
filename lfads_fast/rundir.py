"""Output directories and files of a run: the run lock, writability checks done before any
expensive work, stale temporary files, and file permissions that follow the umask.

The run lock is an OS-level advisory lock (``fcntl.flock``) on a small lock file that holds the
owner's process id. The kernel releases it when the owning process exits or is killed, so a
``kill -9`` never leaves a directory locked; a lock file left behind by a killed run is taken
over by the next run. The lock is re-entrant within one thread (the CLI takes it, then
Trainer.fit takes it again on the same directory); another thread or process that asks for it
gets :class:`RunLockedError` naming the holder's process id.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from pathlib import Path

__all__ = [
    "RunLockedError",
    "run_lock",
    "lock_path_for",
    "check_writable_dir",
    "check_writable_file",
    "remove_stale_temp_files",
    "umask_mode",
    "TEMP_PREFIX",
]

LOCK_NAME = ".lock"
# write_h5_atomic's and the trainer's temporary files start with this.
TEMP_PREFIX = ".tmp_"

# Locks this process holds: resolved lock path -> [fd, owning thread id, depth].
_held: dict[str, list] = {}
_held_guard = threading.Lock()


class RunLockedError(RuntimeError):
    """Another process (or thread) holds the run lock of an output directory or file.

    Attributes:
        path: the lock file.
        pid: the holder's process id as written in the lock file (None if unreadable).
    """

    def __init__(self, message: str, path: str, pid: int | None):
        super().__init__(message)
        self.path, self.pid = path, pid


def lock_path_for(target: str | os.PathLike, *, is_dir: bool) -> Path:
    """The lock file of an output: ``DIR/.lock`` for a directory, ``.NAME.lock`` beside a
    file."""
    target = Path(target)
    if is_dir:
        return target / LOCK_NAME
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def run_lock(target: str | os.PathLike, *, is_dir: bool = True, what: str = "run"):
    """Holds the run lock of an output directory (or output file) for the ``with`` block.

    The directory (or the file's directory) is created when missing. Re-entrant within the
    thread that holds the lock.

    Args:
        target: the output directory, or the output file when is_dir is False.
        is_dir: target is a directory (lock file inside it) or a file (lock file beside it).
        what: what the caller does there, for the message ("training", "inference", ...).

    Raises:
        RunLockedError: another process or thread holds the lock.
        OSError: the directory cannot be created or the lock file cannot be written (see
            check_writable_dir for a clear message first).
    """
    path = lock_path_for(target, is_dir=is_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(path)
    me = threading.get_ident()
    with _held_guard:
        entry = _held.get(key)
        if entry is not None:
            if entry[1] != me:
                raise RunLockedError(f"{target} is in use by another thread of this process "
                                     f"(pid {os.getpid()})", str(path), os.getpid())
            entry[2] += 1
    if entry is not None:
        try:
            yield path
        finally:
            with _held_guard:
                entry[2] -= 1
        return
    fd = _acquire(path, target, what)
    with _held_guard:
        _held[key] = [fd, me, 1]
    try:
        yield path
    finally:
        with _held_guard:
            del _held[key]
        # Unlink while holding the lock, then close: a process that opened the old file
        # meanwhile notices (in _acquire) that its file is no longer the one at the path.
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _acquire(path: Path, target, what: str) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, umask_mode(0o666))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise
            pid = _read_pid(path)
            holder = f"process {pid}" if pid is not None else "another process"
            raise RunLockedError(f"{target} is in use: {holder} holds its lock ({path}); wait "
                                 f"for it to finish, or choose another output for this {what}",
                                 str(path), pid) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file between our open and flock
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def check_writable_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Creates a directory when missing and checks that files can be written in it.

    Raises:
        ValueError: the path (or a parent) is a regular file, or the directory cannot be
            created or written; the message names the path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path}: exists and is not a directory")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{what} {path}: {parent} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot create the directory ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: the directory is not writable")
    return path


def check_writable_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """Checks that a file can be written at path (its directory exists or can be created,
    and path is not a directory), before the work that produces it.

    Raises:
        ValueError: path names a directory, or its directory cannot be created or written.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path}: is a directory; expected a file name (e.g. "
                         f"{path / 'posterior.h5'})")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path}: the file exists and is not writable")
    check_writable_dir(path.parent, what=f"{what} {path}: its directory")
    return path


def remove_stale_temp_files(directory: str | os.PathLike) -> list[str]:
    """Removes the temporary files (``.tmp_*``) a killed run left in a directory; returns
    their names. Call it only while holding the directory's run lock."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if p.name.startswith(TEMP_PREFIX) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p.name)
    return removed


def umask_mode(mode: int = 0o666) -> int:
    """mode with the process's umask applied (what open() would give a new file)."""
    return mode & ~_umask()


def _umask() -> int:
    # /proc/self/status has it without changing it (os.umask would, for a moment, for every
    # thread of the process).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _held_guard:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask
