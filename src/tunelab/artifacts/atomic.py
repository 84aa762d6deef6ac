"""Directories that appear complete or not at all: write into a temp dir beside the target, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tunelab.artifacts.recovery import recover, temp_name
from tunelab.errors import ArtifactError
from tunelab.jsonio import disk_full, fsync_path, is_disk_full


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temp dir next to `out_dir`; on success fsync it and move it to `out_dir`.

    An existing `out_dir` is replaced only after the new one is complete: the complete temp dir is renamed to
    `.NAME.new-PID-*` first, so a kill between the two renames of the swap can be finished by the next start
    (`tunelab.artifacts.recovery`), which this also runs on `out_dir`'s parent. On any failure the temp dir is
    removed and `out_dir` is left as it was; a full disk (an OSError, or safetensors' error for it) becomes a
    `ResourceError` "disk full while writing ...", any other OS error an `ArtifactError` naming it.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out}: exists and is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        recover(out.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise ArtifactError(f"{out}: cannot create it ({e.strerror or e}); expected a writable directory path") from None
    ready = temp_name(out, "new")
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the artifact is an ordinary dir
        yield tmp
        _fsync_tree(tmp)
        os.rename(tmp, ready)  # complete: from here on a recovery may finish the swap
        replace_dir(ready, out)
    except BaseException as e:
        for path in (tmp, ready):
            shutil.rmtree(path, ignore_errors=True)
        if is_disk_full(e):
            raise disk_full(out, "the previous contents are intact") from None
        if isinstance(e, OSError):
            raise ArtifactError(f"{out}: could not write it ({e.strerror or e}); the previous contents are "
                                f"intact") from None
        raise


@contextlib.contextmanager
def atomic_file(out_file: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `out_file` (`.NAME.tmp-PID-*`); on success fsync it and rename it to `out_file`.

    On any failure the temp file is removed and nothing is left at `out_file`; a full disk becomes a
    `ResourceError`, any other OS error an `ArtifactError` naming the file (as `atomic_dir`).
    """
    out = Path(out_file)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        recover(out.parent)
    except OSError as e:
        raise ArtifactError(f"{out}: cannot create its directory ({e.strerror or e})") from None
    tmp = temp_name(out, "tmp")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
        fsync_path(out.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(out, "nothing was written") from None
        if isinstance(e, OSError):
            raise ArtifactError(f"{out}: could not write it ({e.strerror or e})") from None
        raise


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then the directories themselves."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_path(Path(dirpath))


def replace_dir(tmp: Path, out: Path, aside: Path | None = None) -> None:
    """Move the complete `tmp` to `out`; an old `out` is moved to `aside` first and deleted afterwards."""
    old = None
    if out.exists():
        old = aside or temp_name(out, "old")
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def artifact_bytes(path: str | Path) -> int:
    """Total size in bytes of a file, or of every file under a directory."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
