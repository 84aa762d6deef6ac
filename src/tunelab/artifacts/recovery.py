"""Clean up after tunelab processes that died mid-write: finish or roll back a half-done swap, remove temp files.

Every temp name tunelab writes beside a target carries the writer's pid: `.NAME.tmp-PID-*` (being written),
`.NAME.new-PID-*` (complete, about to replace NAME), `.NAME.old-PID-*` (the previous NAME, moved aside). Only
names of this pattern whose pid is no longer alive are touched, so a run in progress, or anything not
written by tunelab, is left alone. A replacement is two renames (NAME -> old, new -> NAME); a kill between
them leaves no NAME. The next start then finishes it (the new dir is complete by construction) or, when
only the old one is there, rolls it back; each recovery is reported in one line.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger("tunelab.artifacts")

TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|new|old)-(?P<pid>\d+)(?:-[^/]*)?$")


def temp_name(target: Path, kind: str, suffix: str = "") -> Path:
    """The temp path beside `target` of `kind` (tmp, new, old) for this process."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{suffix or os.urandom(4).hex()}")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (ours included)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(parent: Path, name: str | None) -> list[tuple[Path, str, str]]:
    """(path, target name, kind) of every temp entry in `parent` left by a process that is gone."""
    found = []
    for entry in sorted(parent.iterdir()):
        match = TEMP_RE.match(entry.name)
        if match and (name is None or match["name"] == name) and not pid_alive(int(match["pid"])):
            found.append((entry, match["name"], match["kind"]))
    return found


def recover(parent: str | Path, name: str | None = None) -> list[str]:
    """Finish or roll back interrupted swaps in `parent` (of `name` only, when given), then remove the stale
    temp entries of dead tunelab processes. Logs and returns one line per thing done."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    try:
        stale = _stale(parent, name)
    except OSError:  # an unreadable parent: the caller's own check names it
        return []
    notices = []
    for kind, did in (("new", "finished the replacement"), ("old", "rolled back to the previous version")):
        for entry, target, entry_kind in stale:
            out = parent / target
            if entry_kind == kind and entry.exists() and not out.exists():
                os.rename(entry, out)
                notices.append(f"{out}: an interrupted run left it half-replaced; {did} ({entry.name})")
    removed = [entry for entry, _, _ in stale if entry.exists() or entry.is_symlink()]
    for entry in removed:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    if removed:
        shown = ", ".join(e.name for e in removed[:3]) + (", ..." if len(removed) > 3 else "")
        notices.append(f"{parent}: removed {len(removed)} temp file(s) of interrupted tunelab runs ({shown})")
    for line in notices:
        log.warning(line)
    return notices
