"""Running one job of `tunelab compare` in a fresh interpreter (`python -m tunelab.measure.compare_worker KIND
JOB RESULT`), so that no memory figure leaks from one job into the next; killing it with the compare.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tunelab.errors import ArtifactError
from tunelab.interrupts import PARENT_PID_ENV
from tunelab.jsonio import read_json_object

WORKER_MODULE = "tunelab.measure.compare_worker"  # `python -m tunelab.measure.compare_worker KIND JOB RESULT`


def run_worker(kind: str, job: dict, job_dir: Path, poll=None, timeout_s: float | None = None,
               nproc: int = 1, env: dict[str, str] | None = None) -> dict:
    """Run one worker in a fresh interpreter and return its result dict (status 'failed' with an error if it died).

    `env` adds to the worker's environment (`CUDA_VISIBLE_DEVICES` for its device under `compare --devices`).

    `nproc` > 1: the worker runs on that many processes under torchrun (the strategy trains on all of them,
    rank 0 writes the result); their parent is then torchrun's agent, not this process.
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    job_path, result_path = job_dir / "job.json", job_dir / "result.json"
    job_path.write_text(json.dumps(job, indent=1))
    result_path.unlink(missing_ok=True)
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launch, "-m", WORKER_MODULE, kind, str(job_path), str(result_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           PARENT_PID_ENV: str(os.getpid()) if nproc == 1 else "", **(env or {})}
    with open(job_dir / "worker.log", "w") as log:
        # its own process group: a Ctrl-C at the terminal reaches the parent, which then kills the whole group
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, process_group=0)
        timed_out = _wait(proc, poll, timeout_s)
    if poll:
        poll()
    result = read_json_object(result_path, ArtifactError) if result_path.exists() else {}
    if timed_out:
        return {**result, "status": "failed", "error": f"stopped after the {timeout_s:g} s limit per strategy"}
    if proc.returncode != 0 and result.get("status") != "failed":
        return {**result, "status": "failed", "error": _exit_reason(proc.returncode, job_dir / "worker.log")}
    return result


def _wait(proc: subprocess.Popen, poll, timeout_s: float | None) -> bool:
    """Wait for `proc`, calling `poll` twice a second; kill it past `timeout_s`. Returns whether it timed out.

    If the parent stops (Ctrl-C, SIGTERM, an error), the worker's process group is killed too: no training
    outlives the compare. A parent killed with -9 cannot do this; the worker then dies by its parent-death
    signal (`tunelab.interrupts.die_with_parent`).
    """
    start = time.monotonic()
    try:
        while proc.poll() is None:
            if poll:
                poll()
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                _kill_group(proc)
                return True
            time.sleep(0.5)
        return False
    finally:
        _kill_group(proc)
        proc.wait()


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the worker and anything it started (its process group)."""
    if proc.returncode is not None or proc.poll() is not None:
        return  # never signal a pid already reaped (it may be reused)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(proc.pid) == proc.pid:  # a group leader (as `_run_worker` starts it)
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()


def _exit_reason(returncode: int, log_path: Path) -> str:
    """One line on why a worker died without writing its result: the signal, or the log's last line."""
    if returncode < 0:
        hint = " (out of memory?)" if returncode == -9 else ""
        return f"worker killed by signal {-returncode}{hint}; see {log_path}"
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else "no output"
    return f"worker exited with code {returncode}: {last[:300]}"
