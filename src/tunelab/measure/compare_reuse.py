"""Rerunning `tunelab compare` into the same `--output`: finished runs and lr searches are reused, not retrained.

A strategy's run dir is reused when its worker finished (`result.json` status ok, `run.json` status
completed), the job it ran is the job asked for now (same run config, artifact kind and reference file), and
the model and data are unchanged by content (`tunelab.fingerprint`). Anything else is trained afresh.
The reports of an earlier compare are removed before anything trains, so they never sit beside the runs of a
new compare that has not finished.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tunelab.errors import TunelabError

REPORTS = ("results.json", "report.md", "report.html")
PLOTS = "plots"


def _object(path: Path) -> dict:
    from tunelab.jsonio import read_json_object

    try:
        return read_json_object(path, TunelabError)
    except TunelabError:
        return {}


def reusable_result(run_dir: Path, job: dict) -> dict | None:
    """The worker result of a finished strategy in `run_dir` that ran `job` on the same inputs, else None."""
    from tunelab.fingerprint import fingerprints

    if _object(run_dir / "job.json") != job:
        return None
    result, summary = _object(run_dir / "result.json"), _object(run_dir / "run.json")
    if result.get("status") != "ok" or summary.get("status") != "completed" or not summary.get("fingerprints"):
        return None
    run = job["run"]
    try:
        now = fingerprints(run["model"], run["data"])
    except TunelabError:
        return None
    return result if summary["fingerprints"] == now else None


def reusable_search(job_dir: Path, job: dict) -> dict | None:
    """The result of a finished lr search in `job_dir` that ran `job` on the same model and data, else None."""
    from tunelab.fingerprint import fingerprints

    result = _object(job_dir / "result.json")
    if _object(job_dir / "job.json") != job or result.get("status") != "ok" or not result.get("fingerprints"):
        return None
    run = job["runs"][0]
    try:
        now = fingerprints(run["model"], run["data"])
    except TunelabError:
        return None
    return result if result["fingerprints"] == now else None


def remove_reports(out: Path) -> None:
    """Remove the reports of an earlier compare in `out` (the runs stay, for reuse)."""
    for name in REPORTS:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / PLOTS, ignore_errors=True)
