"""Checkpoints on disk: atomic save, discovery of the newest complete one, retention, stale temp cleanup.

A checkpoint is the directory `checkpoints/step-N/`. It is written as `checkpoints/.tmp-step-N-<pid>/`: every
file is written and fsynced, then the `COMPLETE` marker (the size and sha256 of every file) is written last,
the directory is fsynced and renamed to `step-N`, and the parent is fsynced. A directory without a valid
marker, or whose files do not match it, is never chosen for a resume.

What goes into the files is decided by `tunelab.train.state`; this module only moves bytes safely.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from tunelab.artifacts.atomic import replace_dir
from tunelab.artifacts.recovery import pid_alive
from tunelab.errors import ResourceError
from tunelab.jsonio import fsync_path

log = logging.getLogger("tunelab.train")

MARKER = "COMPLETE"
STEP_RE = re.compile(r"^step-(\d+)$")
TMP_PREFIX = ".tmp-"
SAVE_DELAY_ENV = "TUNELAB_TEST_SAVE_DELAY"  # test hook: seconds to sleep after each file of a checkpoint

Writer = Callable[[Path], None]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def temp_dir(root: Path, step: int, pid: int | None = None) -> Path:
    """Where checkpoint `step` is written before its rename; `pid` (default: this process) names the writer."""
    return root / f"{TMP_PREFIX}step-{step}-{pid or os.getpid()}"


def save_checkpoint(root: Path, step: int, writers: dict[str, Writer], *, filled: Path | None = None,
                    hashed: dict[str, dict] | None = None) -> Path:
    """Write checkpoint `step` under `root` atomically and return its final path.

    `writers` maps each file name to a function that writes that file at the given path. `filled`: a temp dir
    (`temp_dir(root, step, pid)`) into which other processes, the ranks of a distributed run, already wrote
    files; those are fsynced and listed in the marker beside the writers' files (`hashed`: the records of those
    their writers already took, `file_record`, by path relative to the temp dir). On an OSError (disk full
    included) the temp dir is removed, earlier checkpoints are untouched, and a `ResourceError` naming the path
    is raised.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = filled or temp_dir(root, step)
    try:
        _write_tmp(tmp, step, writers, fresh=filled is None, hashed=hashed or {})
        _move_into_place(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise ResourceError(f"{final}: could not write checkpoint ({what}); earlier checkpoints are intact") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` with plain file I/O (so a full disk surfaces as OSError ENOSPC)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()


def file_record(path: Path) -> dict:
    """What the `COMPLETE` marker says of one file: its size and sha256."""
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _write_tmp(tmp: Path, step: int, writers: dict[str, Writer], fresh: bool = True,
               hashed: dict[str, dict] | None = None) -> None:
    delay = float(os.environ.get(SAVE_DELAY_ENV, "0") or 0)
    if fresh:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):  # written by other processes (`filled`)
        fsync_path(path)
        name = path.relative_to(tmp).as_posix()
        files[name] = (hashed or {}).get(name) or file_record(path)
    for sub in sorted(p for p in tmp.rglob("*") if p.is_dir()):
        fsync_path(sub)
    for name, write in writers.items():
        path = tmp / name
        write(path)
        fsync_path(path)
        files[name] = file_record(path)
        if delay:
            time.sleep(delay)
    marker = tmp / MARKER
    marker.write_text(json.dumps({"step": step, "files": files}, indent=1))
    fsync_path(marker)
    fsync_path(tmp)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is swapped out first (under the temp prefix, so a crash
    leaves it to the stale-dir cleanup) and removed after."""
    replace_dir(tmp, final, aside=final.with_name(f"{TMP_PREFIX}replaced-{final.name}-{os.getpid()}"))


def verify(path: Path) -> str | None:
    """Why checkpoint dir `path` is not usable (missing/unreadable marker, missing or changed file), or None."""
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (torn or still being written)"
    try:
        meta = json.loads(marker.read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MARKER} marker is not valid JSON with a file list"
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            return f"file {name} listed in {MARKER} is missing"
        if f.stat().st_size != info.get("bytes"):
            return f"file {name} has {f.stat().st_size} bytes, {MARKER} says {info.get('bytes')}"
        if _sha256(f) != info.get("sha256"):
            return f"file {name} does not match its checksum in {MARKER}"
    return None


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step-N` directory under `root`, newest first (complete or not)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return sorted(found, reverse=True)


def find_latest(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint under `root` (or None), and every newer one skipped with the reason."""
    skipped = []
    for _, path in step_dirs(root):
        reason = verify(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def complete_steps(root: Path) -> list[Path]:
    """Complete checkpoints (marker present and readable), newest first; contents are not re-hashed."""
    out = []
    for _, path in step_dirs(root):
        try:
            json.loads((path / MARKER).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out.append(path)
    return out


def apply_retention(root: Path, keep_last: int | None) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`; never the newest. Failures only warn.

    Returns the deleted paths.
    """
    if not keep_last:
        return []
    deleted = []
    for path in complete_steps(root)[max(1, keep_last):]:
        try:
            shutil.rmtree(path)
            deleted.append(path)
        except OSError as e:
            log.warning("could not delete old checkpoint %s: %s", path, e.strerror or e)
    return deleted


def clean_stale(root: Path) -> list[Path]:
    """Remove temp dirs left by processes that died mid-save (their pid is gone, or is this process)."""
    removed = []
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        if not (path.is_dir() and path.name.startswith(TMP_PREFIX)):
            continue
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
