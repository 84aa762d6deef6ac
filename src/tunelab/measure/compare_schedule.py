"""`tunelab compare --devices`: the runs of a compare spread over several devices, one worker per device at a time.

A compare is a list of `Job`s (a strategy's lr search, then one job per seed that needs the search's lr). With
one device they run in the main thread, in list order: exactly the sequential compare. With several, a pool of
one thread per device runs them: a free device takes the first job in list order whose dependency has
finished, so no device ever runs two workers at once (a timing or memory figure is never shared) and a seed
never starts before its strategy's lr search ended. Each worker sees only its own GPU
(`CUDA_VISIBLE_DEVICES`), so it trains on `cuda` and the allocator's peak is that GPU's alone.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any


class Stopped(Exception):
    """Raised in a job's thread (from its worker's poll) once the compare is stopping; its worker is killed."""


@dataclass(frozen=True)
class Job:
    """One worker run: `run(device, results)` gets its device and the results of the jobs finished so far (its
    dependency's among them) and returns its own result; `after` is the key of the job it needs first."""

    key: Hashable
    run: Callable[[str, dict], Any]
    after: Hashable | None = None


def run_jobs(jobs: Sequence[Job], devices: Sequence[str], stop: threading.Event | None = None) -> dict:
    """Run every job, each device running at most one at a time; returns {key: result}.

    A job starts only once the job named by its `after` finished. If a job raises or the calling thread is
    interrupted, `stop` is set (jobs' workers poll it through `check`), the running jobs are waited for, and the
    exception is raised again; no job starts after that.
    """
    keys = [j.key for j in jobs]
    late = [j.key for i, j in enumerate(jobs) if j.after is not None and j.after not in keys[:i]]
    if late or len(set(keys)) != len(keys):
        raise ValueError(f"jobs: expected unique keys, each 'after' naming an earlier job; not so for {late}")
    if len(devices) == 1:
        results: dict = {}
        for job in jobs:  # list order keeps every dependency before its dependents
            results[job.key] = job.run(devices[0], results)
        return results
    return _pooled(list(jobs), list(devices), stop if stop is not None else threading.Event())


def _pooled(pending: list[Job], devices: list[str], stop: threading.Event) -> dict:
    results: dict = {}
    free = list(devices)
    running: dict[Future, tuple[Job, str]] = {}
    with ThreadPoolExecutor(max_workers=len(devices), thread_name_prefix="compare-device") as pool:
        try:
            while pending or running:
                while free and (job := _next_ready(pending, results)) is not None:
                    device = free.pop(0)
                    pending.remove(job)
                    running[pool.submit(job.run, device, dict(results))] = (job, device)
                if not running:
                    raise RuntimeError(f"jobs wait on each other: {[j.key for j in pending]}")
                done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    job, device = running.pop(future)
                    results[job.key] = future.result()  # a job's exception stops the compare
                    free.append(device)
                    free.sort(key=devices.index)  # the first free device in the given order goes first
        except BaseException:
            stop.set()  # the running jobs' workers see it at their next poll and are killed
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def _next_ready(pending: list[Job], results: dict) -> Job | None:
    """The first pending job whose dependency has finished (list order: a strategy's search before its seeds)."""
    return next((j for j in pending if j.after is None or j.after in results), None)


def check(stop: threading.Event | None) -> None:
    """Raise `Stopped` once `stop` is set: called from a worker's poll, so its worker is killed at once."""
    if stop is not None and stop.is_set():
        raise Stopped("the compare is stopping")


def worker_env(device: str) -> dict[str, str]:
    """Environment for a worker on `device`: `cuda:N` sees only GPU N of this process's visible GPUs (so it
    trains on `cuda`, and `max_memory_allocated` is that GPU's); any other device changes nothing."""
    if not device.startswith("cuda:"):
        return {}
    index = int(device.partition(":")[2])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        return {"CUDA_VISIBLE_DEVICES": ids[index] if index < len(ids) else str(index)}
    return {"CUDA_VISIBLE_DEVICES": str(index)}


def check_devices(devices: Sequence[str], gpu_count: int) -> None:
    """Raise a one-line `ConfigError` for a `cuda:N` beyond this machine's `gpu_count` visible GPUs."""
    from tunelab.errors import ConfigError

    for d in devices:
        if d.startswith("cuda:") and int(d.partition(":")[2]) >= gpu_count:
            have = f"cuda:0 to cuda:{gpu_count - 1}" if gpu_count else "none"
            raise ConfigError(f"--devices {','.join(devices)}: {d} is not on this machine; expected one of its "
                              f"{gpu_count} visible CUDA devices ({have})")
