"""JSON files read with errors that name the file, and written atomically (the ground floor).

`read_json_object` refuses what is not a JSON object, and refuses nesting deep enough to exhaust the
interpreter's stack, in one line naming the file; `write_json_atomic` writes through a fsynced temp file and
a rename, so a reader sees the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError


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


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON to `path` through a fsynced temp file and a rename."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        fsync_path(tmp)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(p.parent)
