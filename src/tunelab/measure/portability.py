"""Task portability: what it costs to serve K tasks with one strategy, on disk and in switching time.

A whole-model strategy (full fine-tuning) needs K models on disk and a full `load_model` to switch tasks. An
adapter strategy needs one shared base plus K small artifacts, and switches by `load_adapter` + `set_active` on a
base that is already loaded. Both figures are measured here on the artifacts a compare run just wrote.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from tunelab.artifacts import inspect, load_adapter
from tunelab.measure.schema import TASK_COUNTS, Portability
from tunelab.methods.base import set_active
from tunelab.models import load_model


def serve_bytes(artifact: str, bytes_per_task: int, base_bytes: int, k: int) -> int:
    """Bytes on disk to serve `k` tasks: `k` whole models, or one base plus `k` adapters."""
    if artifact == "model":
        return k * bytes_per_task
    return base_bytes + k * bytes_per_task


def portability_record(artifact: str, bytes_per_task: int, base_bytes: int,
                       attach_seconds: float | None = None, switch_seconds: float | None = None) -> Portability:
    """The `Portability` record of one strategy, with serve bytes for K in `TASK_COUNTS`."""
    shared = 0 if artifact == "model" else base_bytes
    return Portability(
        artifact=artifact, bytes_per_task=bytes_per_task, base_bytes=shared,
        serve_bytes={k: serve_bytes(artifact, bytes_per_task, base_bytes, k) for k in TASK_COUNTS},
        attach_seconds=attach_seconds, switch_seconds=switch_seconds,
    )


def time_adapter_attach(model, adapter_dir: str | Path, repeats: int = 3) -> tuple[float, float]:
    """Time attaching a saved adapter to an already loaded base, and switching between loaded adapters.

    Attach is `load_adapter` + `set_active` (median of `repeats`, each under a new name, so every one reads the
    files and injects afresh). Switch is `set_active` from one loaded adapter to another (median of 100).
    Leaves the first attached adapter, `task0`, active. Returns (attach_seconds, switch_seconds).
    """
    attach = []
    for i in range(max(repeats, 2)):  # at least two adapters, to switch between them
        start = time.perf_counter()
        load_adapter(model, adapter_dir, name=f"task{i}")
        set_active(model, [f"task{i}"])
        attach.append(time.perf_counter() - start)
    switch = []
    for i in range(100):
        start = time.perf_counter()
        set_active(model, [f"task{i % 2}"])
        switch.append(time.perf_counter() - start)
    set_active(model, ["task0"])
    return statistics.median(attach), statistics.median(switch)


def time_model_load(path: str | Path, task: str, **load_kwargs):
    """Time `load_model` of a whole model dir (what switching tasks costs without adapters).

    Returns (seconds, LoadedModel).
    """
    start = time.perf_counter()
    loaded = load_model(str(path), task, **load_kwargs)
    return time.perf_counter() - start, loaded


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KB' (decimal units, as disks are sold); None -> '-'."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def load_trained(run, artifact: str):
    """Load what a strategy's run wrote, timing the switch a server would make, for the after-training figures.

    `run` is the strategy's `RunConfig`; its artifact is `<run.output>/artifact`. A whole model is timed with
    `load_model`; an adapter is attached to a freshly loaded base, timed by `time_adapter_attach`.
    Returns (LoadedModel, {"attach_seconds": ..., "switch_seconds": ...}).
    """
    artifact_dir = Path(run.output) / "artifact"
    kwargs = dict(dtype=run.dtype, device=run.device, trust_remote_code=run.trust_remote_code,
                  label_names=inspect(artifact_dir).label_names if run.task == "classification" else None)
    if artifact == "model":
        seconds, loaded = time_model_load(artifact_dir, run.task, **kwargs)
        return loaded, {"attach_seconds": seconds, "switch_seconds": None}
    loaded = load_model(run.model, run.task, **kwargs)
    attach, switch = time_adapter_attach(loaded.model, artifact_dir)
    return loaded, {"attach_seconds": attach, "switch_seconds": switch}
