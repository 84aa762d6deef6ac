"""`metrics.jsonl`: one JSON object per logged step and per evaluation, appended and flushed as they happen."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tunelab.jsonio import disk_full, fsync_path, is_disk_full


def _clean(value):
    """NaN/inf are not JSON: write them as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    """Appends records to `path`; on resume, first drops every record after the resumed step.

    `trackers` (`tracking.open_trackers`: TensorBoard, wandb) get each record after the file does.
    """

    def __init__(self, path: Path, *, resume_step: int | None = None, trackers: list | tuple = ()):
        self.path = path
        self.trackers = list(trackers)
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
        """Append one record and flush it to the OS; a full disk is a `ResourceError` naming the file."""
        try:
            self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            self._file.flush()
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(self.path, "the records before this one are intact") from None
            raise
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:  # the write that failed already said why; a second flush of it must not hide that
            pass
        for tracker in self.trackers:
            tracker.close()


class NullMetrics:
    """The metrics log of a rank other than 0 under torchrun: rank 0 alone writes `metrics.jsonl`."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(path: Path) -> list[dict]:
    """Every record of a `metrics.jsonl`."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
