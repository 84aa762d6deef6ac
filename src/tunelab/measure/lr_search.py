"""`--tune-lr`: a short learning-rate search per strategy before its full runs.

Each strategy trains once per factor of `lr_grid` (default 0.3, 1, 3) times its learning rate (the method's
`default_lr`), on `tune_fraction` (default 1/4) of the budget's steps, with the first seed, in one worker
(`compare_worker lr_search`). The lr with the lowest final validation loss trains every seed of the full run.
An lr whose run fails or diverges counts as worst; when every one fails, the default is kept (with a note).
A strategy given `--lr-for` is not searched: the user's lr is used. A rerun into the same output dir reuses a
finished search of the same runs on the same model and data.
"""

from __future__ import annotations

import math
import shutil

from tunelab.measure.compare_reuse import reusable_search
from tunelab.measure.schema import CompareOptions, LrSearch


def search_steps(opts: CompareOptions, steps: int) -> int:
    """The steps each lr of the search trains: `tune_fraction` of the budget, at least 1."""
    return max(1, math.ceil(opts.tune_fraction * steps))


def grid(opts: CompareOptions, lr: float) -> list[float]:
    """The learning rates the search tries around `lr`."""
    return [float(f"{f * lr:.6g}") for f in opts.lr_grid]


def choose(default_lr: float, steps: int, seed: int, points: list[dict]) -> LrSearch:
    """The `LrSearch` record from the worker's points ({lr, val_loss, error}): the lowest finite val loss wins."""
    curve = [(p["lr"], p.get("val_loss")) for p in points]
    finite = [(loss, lr) for lr, loss in curve if loss is not None and math.isfinite(loss)]
    chosen = min(finite)[1] if finite else default_lr
    errors = {f"{p['lr']:g}": p["error"] for p in points if p.get("error")}
    return LrSearch(default_lr=default_lr, steps=steps, seed=seed, curve=curve, chosen_lr=chosen, errors=errors)


def run_search(configs: list, job_dir, run_worker, bar_for) -> list[dict]:
    """Train `configs` (one `RunConfig` per lr) in one worker; returns its points. `bar_for(total)` gives the
    progress bar context; `run_worker(kind, job, dir, poll)` runs the worker."""
    from tunelab.measure.gather import MetricsFollower

    job = {"runs": [c.model_dump(mode="json") for c in configs]}
    previous = reusable_search(job_dir, job)  # an earlier compare into the same output dir finished it
    if previous is not None:
        return previous["points"]
    shutil.rmtree(job_dir, ignore_errors=True)
    followers = [MetricsFollower(f"{c.output}/metrics.jsonl") for c in configs]
    steps = configs[0].max_steps

    def poll(bar):
        for i, f in enumerate(followers):
            bar.update([{**r, "step": r["step"] + i * steps} if "step" in r else r for r in f.new_records()])

    with bar_for(steps * len(configs)) as bar:
        worker = run_worker("lr_search", job, job_dir, lambda: poll(bar))
        bar.finish(worker.get("status") == "ok", worker.get("error"))
    if worker.get("status") != "ok":
        return [{"lr": c.lr, "val_loss": None, "error": worker.get("error", "search worker failed")}
                for c in configs]
    return worker["points"]
