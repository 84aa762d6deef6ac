"""A run dir has one writer at a time, and a finished run in it is replaced only when asked.

The writer holds an exclusive `flock` on `RUN_DIR/.tunelab.lock` for the life of the run (the kernel releases
it when the process ends, however it ends); the file holds the writer's pid so a second writer can name it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from tunelab.errors import ConfigError

LOCK = ".tunelab.lock"
SUMMARY = "run.json"


@contextlib.contextmanager
def run_lock(out: Path, *, resume: bool) -> Iterator[None]:
    """Hold the run dir `out` (created unless resuming) exclusively for the block; a second writer is refused
    in one line naming the holder's pid."""
    if not out.is_dir():
        if resume:
            raise ConfigError(f"{out}: cannot resume, the output directory does not exist")
        out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(f"{out}: in use by another tunelab run (pid {holder}); wait for it to end or choose "
                              f"another --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def refuse_finished(out: Path, overwrite: bool) -> None:
    """A fresh run must not start over a finished one (its run.json, metrics and artifact) unless `overwrite`."""
    if (out / SUMMARY).is_file() and not overwrite:
        raise ConfigError(f"{out}: holds a finished run ({SUMMARY}); pass --overwrite to replace it, or choose "
                          f"another --output")
