"""`--tune-lr` past the grid's edge: with a stubbed search worker whose val loss is a function of lr, the
search extends where the best lr is the largest (or smallest) tried, at most `MAX_EXTENSIONS` times, and not
where the middle is best; every lr tried is in the curve."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from tunelab.measure.lr_search import MAX_EXTENSIONS, choose, extended_search, next_lr

FACTORS = [0.3, 1.0, 3.0]
DEFAULT = 1e-3


class Config(SimpleNamespace):
    def model_dump(self, mode="json"):
        return {"lr": self.lr, "output": self.output, "max_steps": self.max_steps}


def _search(tmp_path, loss_of, dirs=None):
    """Run the extended search with a worker that 'trains' each lr of its job to `loss_of(lr)`; returns the
    search record and the lrs of each worker's job (`dirs` collects the workers' job dirs)."""
    jobs, dirs = [], [] if dirs is None else dirs

    def worker(kind, job, job_dir, poll):
        assert kind == "lr_search" and all(run["output"].startswith(str(job_dir)) for run in job["runs"])
        jobs.append([run["lr"] for run in job["runs"]])
        dirs.append(job_dir)
        poll()
        return {"status": "ok", "points": [{"lr": run["lr"], "val_loss": loss_of(run["lr"]), "error": None}
                                           for run in job["runs"]]}

    class Bar:
        def __init__(self, total, *extension):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def update(self, records):
            pass

        def finish(self, ok, error=None):
            assert ok

    def config_for(lr, run_dir):
        return Config(lr=lr, output=str(run_dir), max_steps=2)

    lrs = [float(f"{f * DEFAULT:.6g}") for f in FACTORS]
    points = extended_search([config_for(x, tmp_path / f"lr-{x:g}") for x in lrs], config_for, FACTORS,
                             tmp_path, worker, Bar)
    return choose(DEFAULT, 2, 0, points, lrs), jobs


def test_loss_falling_with_lr_extends_upwards_at_most_max_extensions_times(tmp_path):
    dirs = []
    search, jobs = _search(tmp_path, lambda lr: 1.0 / lr, dirs)  # the larger the better: always the top
    assert jobs == [[3e-4, 1e-3, 3e-3], [9e-3], [2.7e-2]][:1 + MAX_EXTENSIONS]
    assert [lr for lr, _ in search.curve] == [3e-4, 1e-3, 3e-3, 9e-3, 2.7e-2][:3 + MAX_EXTENSIONS]
    assert search.extended == [9e-3, 2.7e-2][:MAX_EXTENSIONS] and search.chosen_lr == search.curve[-1][0]
    assert dirs == [tmp_path, tmp_path / "extend-1", tmp_path / "extend-2"][:1 + MAX_EXTENSIONS]


def test_loss_rising_with_lr_extends_downwards(tmp_path):
    search, jobs = _search(tmp_path, lambda lr: lr)
    assert jobs[1] == [pytest.approx(3e-4 / (1.0 / 0.3))]  # one grid step on that side: 1/0.3
    assert search.chosen_lr == search.curve[0][0] < 3e-4 and len(search.extended) == MAX_EXTENSIONS


def test_a_best_in_the_middle_does_not_extend(tmp_path):
    search, jobs = _search(tmp_path, lambda lr: (math.log(lr) - math.log(1e-3)) ** 2)
    assert jobs == [[3e-4, 1e-3, 3e-3]] and search.extended == [] and search.chosen_lr == 1e-3


def test_an_extension_that_overshoots_stops_the_search(tmp_path):
    search, jobs = _search(tmp_path, lambda lr: (math.log(lr) - math.log(5e-3)) ** 2)  # best between 3e-3, 9e-3
    assert jobs == [[3e-4, 1e-3, 3e-3], [9e-3]] and search.extended == [9e-3]
    assert search.chosen_lr == 3e-3


def test_next_lr_ignores_failed_lrs_and_single_points():
    top_failed = [{"lr": 1.0, "val_loss": 2.0}, {"lr": 3.0, "val_loss": 1.0}, {"lr": 9.0, "val_loss": None}]
    assert next_lr(top_failed, FACTORS) is None  # the diverged top is the edge; the best is inside
    assert next_lr([{"lr": 1.0, "val_loss": 1.0}], [1.0]) is None
    assert next_lr([{"lr": 1.0, "val_loss": None}, {"lr": 3.0, "val_loss": math.nan}], FACTORS) is None
    assert next_lr(top_failed[:2], FACTORS) == 9.0
