"""`--tune-lr`: a short learning-rate search per strategy before its full runs.

Each strategy trains once per factor of `lr_grid` (default 0.3, 1, 3) times its learning rate (the method's
`default_lr`), on `tune_fraction` (default 1/4) of the budget's steps, with the first seed, in one worker
(`compare_worker lr_search`). The lr with the lowest final validation loss trains every seed of the full run.
An lr whose run fails or diverges counts as worst; when every one fails, the default is kept (with a note).
When the best lr is the largest (or smallest) one tried, the true best may lie beyond the grid: the search then
trains one more lr further out in that direction, one grid step on (the ratio of the grid's two outermost factors
on that side; 3 for a one-factor grid), in a worker of its own, and repeats while the new lr is again the best,
at most `MAX_EXTENSIONS` (2) times per strategy. Every lr tried is in the curve.
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


MAX_EXTENSIONS = 2  # extra lrs beyond the grid per strategy, each one step further out
DEFAULT_STEP = 3.0  # the step beyond a one-factor grid


def _round(lr: float) -> float:
    return float(f"{lr:.6g}")


def grid(opts: CompareOptions, lr: float) -> list[float]:
    """The learning rates the search tries around `lr`."""
    return [_round(f * lr) for f in opts.lr_grid]


def next_lr(points: list[dict], factors: list[float]) -> float | None:
    """The lr to try beyond the ones in `points` when the best finite val loss is at the largest (smallest) lr
    tried and more than one lr was tried: one grid step further up (down); else None.

    `factors` are the grid's (sorted); a step is the ratio of its two outermost factors on that side."""
    lrs = sorted(p["lr"] for p in points)
    finite = [(p["val_loss"], p["lr"]) for p in points if p.get("val_loss") is not None
              and math.isfinite(p["val_loss"])]
    if len(lrs) < 2 or not finite:
        return None
    best = min(finite)[1]
    up = factors[-1] / factors[-2] if len(factors) > 1 else DEFAULT_STEP
    down = factors[1] / factors[0] if len(factors) > 1 else DEFAULT_STEP
    if best == lrs[-1]:
        return _round(best * up)
    if best == lrs[0]:
        return _round(best / down)
    return None


def extended_search(configs: list, config_for, factors: list[float], job_dir, run_worker, bar_for) -> list[dict]:
    """`run_search` over the grid's `configs`, then up to `MAX_EXTENSIONS` single lrs beyond its edge
    (`next_lr`), each in `job_dir/extend-K` with `config_for(lr, run_dir)` as its run; returns every point."""
    points = run_search(configs, job_dir, run_worker, bar_for)
    for k in range(1, MAX_EXTENSIONS + 1):
        lr = next_lr(points, factors)
        if lr is None:
            break
        extend_dir = job_dir / f"extend-{k}"
        points = points + run_search([config_for(lr, extend_dir / f"lr-{lr:g}")], extend_dir, run_worker,
                                     lambda total, k=k: bar_for(total, k))
    return points


def choose(default_lr: float, steps: int, seed: int, points: list[dict], grid_lrs: list[float] | None = None
           ) -> LrSearch:
    """The `LrSearch` record from the workers' points ({lr, val_loss, error}): the lowest finite val loss wins.
    The curve is in order of lr; `extended` lists the lrs tried beyond `grid_lrs` (the grid's)."""
    curve = sorted(((p["lr"], p.get("val_loss")) for p in points), key=lambda point: point[0])
    finite = [(loss, lr) for lr, loss in curve if loss is not None and math.isfinite(loss)]
    chosen = min(finite)[1] if finite else default_lr
    errors = {f"{p['lr']:g}": p["error"] for p in points if p.get("error")}
    extended = [lr for lr, _ in curve if grid_lrs is not None and lr not in grid_lrs]
    return LrSearch(default_lr=default_lr, steps=steps, seed=seed, curve=curve, chosen_lr=chosen, errors=errors,
                    extended=extended)


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
