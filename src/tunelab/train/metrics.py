"""`metrics.jsonl`: one JSON object per logged step and per evaluation, appended and flushed as they happen."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tunelab.jsonio import fsync_path


def _clean(value):
    """NaN/inf are not JSON: write them as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    """Appends records to `path`; on resume, first drops every record after the resumed step."""

    def __init__(self, path: Path, *, resume_step: int | None = None):
        self.path = path
        if resume_step is None:
            path.write_text("")
        else:
            self._truncate_after(resume_step)
        self._file = open(path, "a")

    def _truncate_after(self, step: int) -> None:
        """Keep only records with `step <= step`, rewriting the file atomically."""
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:  # a line torn by a kill mid-write
                    continue
                if isinstance(record, dict) and record.get("step", math.inf) <= step:
                    kept.append(line + "\n")
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept))
        fsync_path(tmp)
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        """Append one record and flush it to the OS."""
        self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict]:
    """Every record of a `metrics.jsonl`."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
