"""JSON files read with errors that name the file, and written atomically (the ground floor).

`read_json_object` refuses what is not a JSON object, and refuses nesting deep enough to exhaust the
interpreter's stack, in one line naming the file; `write_json_atomic` writes through a fsynced temp file and
a rename, so a reader sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from tunelab.errors import ResourceError, TunelabError


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def loads_object(text: str, source: str, error: type[TunelabError]) -> dict[str, Any]:
    """Parse `text` as a JSON object; `error` naming `source` when it is not JSON, too deep, or not an object."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{source}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise error(f"{source}: JSON nested too deeply to read") from None
    if not isinstance(data, dict):
        raise error(f"{source}: expected a JSON object, found {type(data).__name__}")
    return data


def read_json_object(path: str | Path, error: type[TunelabError]) -> dict[str, Any]:
    """The JSON object in file `path`; `error` naming the file when it is missing, unreadable or not an object."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: file not found" if not p.exists() else f"{p}: expected a JSON file, found a directory")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{p}: not valid JSON (not UTF-8 text)") from None
    except OSError as e:
        raise error(f"{p}: cannot read it ({e.strerror or e})") from None
    return loads_object(text, str(p), error)


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC, or safetensors' error for it (safetensors reports I/O errors as text, not as OSError)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    return type(error).__name__ == "SafetensorError" and ("os error 28" in text or "StorageFull" in text)


def disk_full(path: str | Path, kept: str = "the previous state is intact") -> ResourceError:
    """The one-line error for a full disk while writing `path`."""
    return ResourceError(f"disk full while writing {path}; {kept}, and no temp file is left")


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON to `path` through a fsynced temp file and a rename (`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a fsynced temp file and a rename, so a reader sees the old file or the new.

    A full disk is a `ResourceError` naming `path`; the old file stays as it was and the temp file is removed.
    """
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        fsync_path(tmp)
        os.replace(tmp, p)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full(p) from None
        raise
    fsync_path(p.parent)
