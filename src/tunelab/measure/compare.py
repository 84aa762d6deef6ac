"""`tunelab compare`: train every selected strategy on the same model, data and budget, measure each, recommend one.

Each strategy trains in a fresh interpreter (`python -m tunelab.measure.compare_worker strategy JOB RESULT`), so
memory figures do not leak between strategies; a baseline worker first checks the model and data and scores the
untouched base model on the reference prose. The parent follows each worker's `metrics.jsonl` for the progress
display, then gathers `run.json`, the metrics and the worker's own measurements (forgetting, attach time) into
`results.json`, and writes the reports. With `--devices` the runs are spread over several devices, one worker
per device at a time (`tunelab.measure.compare_schedule`).

Output dir layout: `results.json`, `report.md`, `report.html`, `plots/*.png`, and `runs/<strategy>/` (the train
output dir of each strategy, with `worker.log` and the worker's `job.json` / `result.json`).
"""

from __future__ import annotations

import functools
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
from rich.console import Console

import tunelab
from tunelab.config import build_config, parse_columns, parse_set
from tunelab.errors import ConfigError, closest
from tunelab.jsonio import write_json_atomic
from tunelab.measure.compare_budget import LoadSampler, auto_options, budget_steps, warnings_for
from tunelab.measure.gather import (MetricsFollower, _predicted_memory, aggregate,  # noqa: F401 (tests use
                                    baseline_record, not_applicable_record, read_records,  # some from here)
                                    speed_from_metrics, strategy_record)
from tunelab.measure.recommend import recommend
from tunelab.measure.report import CompareProgress, print_table, write_reports
from tunelab.interrupts import raising_signals
from tunelab.measure.compare_schedule import Job, check, check_devices, run_jobs, worker_env
from tunelab.measure.lr_search import choose, extended_search, grid, search_steps
from tunelab.measure.workers import _exit_reason, _wait  # noqa: F401 (tests use them from here)
from tunelab.measure.workers import run_worker as _run_worker  # one name, which tests may wrap
from tunelab.measure.compare_reuse import remove_reports, reusable_result
from tunelab.measure.schema import (Baseline, CompareOptions, CompareResults, Hardware, StrategyResult,
                                    detect_versions)
from tunelab.methods import all_methods, get_method
from tunelab.models import pick_device
from tunelab.validation import parse_model


def parse_lr_for(pairs: list[str] | None) -> dict[str, float]:
    """`["lora=3e-4", "full=2e-5"]` -> `{"lora": 3e-4, "full": 2e-5}` (the CLI's repeatable `--lr-for`)."""
    out = {}
    for pair in pairs or []:
        name, sep, raw = pair.partition("=")
        try:
            out[name.strip()] = float(raw)
        except ValueError:
            raise ConfigError(f"--lr-for {pair!r}: expected METHOD=LR such as lora=3e-4") from None
        if not sep or not name.strip() or out[name.strip()] <= 0:
            raise ConfigError(f"--lr-for {pair!r}: expected METHOD=LR with LR > 0, such as lora=3e-4")
    return out


def parse_options_for(pairs: list[str] | None) -> dict[str, dict]:
    """`["lora.r=16", "lora.target_modules=[q_proj,v_proj]"]` -> `{"lora": {"r": 16, "target_modules": [...]}}`."""
    out: dict[str, dict] = {}
    for pair in pairs or []:
        dotted, sep, raw = pair.partition("=")
        name, dot, key = dotted.partition(".")
        if not sep or not dot or not name.strip() or not key.strip():
            raise ConfigError(f"--set-for {pair!r}: expected METHOD.KEY=VALUE such as lora.r=16")
        out.setdefault(name.strip(), {}).update(parse_set([f"{key}={raw}"]))
    return out


def build_options(values: dict, file_values: dict | None = None, where: str = "compare") -> CompareOptions:
    """`CompareOptions` from CLI values over a `--config` YAML file's: None means the default (or the file's);
    `methods` and `lr_grid` may be "a,b,c"; `lr_for` and `options_for` may be the raw repeatable flags (they add
    to the file's); `columns` may be "prompt=question,...". Bad keys or values raise a one-line `ConfigError`
    naming `where` (the YAML file when one is given)."""
    values = {k: v for k, v in values.items() if v is not None}
    if isinstance(values.get("methods"), str):
        values["methods"] = [m.strip() for m in values["methods"].split(",") if m.strip()]
    if isinstance(values.get("lr_grid"), str):
        values["lr_grid"] = _floats(values["lr_grid"], "--lr-grid")
    if isinstance(values.get("columns"), str):
        values["columns"] = parse_columns(values["columns"])
    merged = dict(file_values or {})
    if isinstance(values.get("lr_for"), list):
        values["lr_for"] = {**merged.get("lr_for", {}), **parse_lr_for(values["lr_for"])}
    if isinstance(values.get("options_for"), list):
        values["options_for"] = {**merged.get("options_for", {}), **parse_options_for(values["options_for"])}
    return parse_model(CompareOptions, {**merged, **values}, where=where)


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected numbers separated by commas, such as 0.3,1,3") from None


def select_methods(opts: CompareOptions) -> list:
    """The `Method`s to compare (all registered when `opts.methods` is None), checking every name first."""
    names = opts.methods if opts.methods is not None else list(all_methods())
    if not names:
        raise ConfigError("--methods: expected at least one method name, found none")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"--methods: {', '.join(repeated)} listed more than once; expected each method once "
                          f"(one run dir per method)")
    chosen = [get_method(n) for n in names]
    for flag, per_method in (("--lr-for", opts.lr_for), ("--set-for", opts.options_for)):
        for name in per_method:
            if name not in names:
                raise ConfigError(f"{flag} names method '{name}', which is not compared{closest(name, names)}; "
                                  f"compared: {', '.join(names)}")
    return chosen


def strategy_config(opts: CompareOptions, method, run_dir: Path, *, steps: int | None = None,
                    lr: float | None = None, seed: int | None = None, options: dict | None = None):
    """The validated `RunConfig` of one run of a strategy: the shared budget plus its own lr, seed and options.

    The learning rate is `lr` (the searched one) when given, else `--lr-for NAME=LR`, else the method's
    `default_lr` (one place for defaults); the options are `options`, else the strategy's `--set-for` options.
    """
    values = dict(model=opts.model, data=opts.data, task=opts.task, method=method.name,
                  method_options=opts.options_for.get(method.name, {}) if options is None else options,
                  output=str(run_dir), seed=opts.seed if seed is None else seed,
                  max_steps=steps or opts.max_steps, batch_size=opts.batch_size, seq_len=opts.seq_len,
                  lr=lr or opts.lr_for.get(method.name, method.default_lr), columns=opts.columns,
                  chat_template=opts.chat_template, eval_batches=opts.eval_batches, device=opts.device,
                  dtype=opts.dtype, master_weights=opts.master_weights)
    return build_config({}, values, where=f"compare strategy '{method.name}'")


def tunes_lr(opts: CompareOptions) -> bool:
    """`--tune-lr` as given; by default on where the runs go to a GPU (the CPU budget is too small for it)."""
    return opts.tune_lr if opts.tune_lr is not None else pick_device(opts.device).type == "cuda"


def run_compare(opts: CompareOptions, console=None) -> CompareResults:
    """Run the whole comparison and write results.json, report.md, report.html and plots/ into `opts.output`.

    Every option is checked before anything trains. A strategy that fails is recorded with its error and the
    others still run; one whose method cannot apply to the model (`Method.not_applicable`, asked in the
    baseline worker) does not run and is recorded as 'not applicable' with the reason. Prints the trade-off
    table and the report's path on `console` (a rich Console).
    """
    console = console or Console(width=None if sys.stdout.isatty() else 220)  # a log file gets the whole table
    out = Path(opts.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out}: is a file, expected a directory")
    methods = select_methods(opts)
    for m in methods:
        strategy_config(opts, m, out / "runs" / m.name)  # every option checked before anything trains
    if opts.devices:
        check_devices(opts.devices, torch.cuda.device_count())
    out.mkdir(parents=True, exist_ok=True)
    remove_reports(out)  # an earlier compare's report must not sit beside this one's unfinished runs
    ctx = _Context(opts, out, tunes_lr(opts))
    searches = sum(ctx.tune and m.name not in opts.lr_for for m in methods)
    with raising_signals(), CompareProgress(console, len(methods) * opts.seeds + searches) as progress:
        ctx.progress = progress
        skipped = _baseline(ctx, methods)
        ctx.steps = budget_steps(opts, ctx.baseline)
        progress.n_strategies -= sum(opts.seeds + (ctx.tune and m.name not in opts.lr_for)
                                     for m in methods if m.name in skipped)
        done = _compare_all(ctx, [m for m in methods if m.name not in skipped])
        strategies = [not_applicable_record(m, skipped[m.name]) if m.name in skipped else done[m.name]
                      for m in methods]
    if ctx.reused:
        reused = [label for label in ctx.labels if label in ctx.reused]  # the order of a sequential compare
        console.print(f"reused finished strategies (same config, model and data): {', '.join(reused)}")
    results = CompareResults(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), tunelab_version=_tunelab_version(),
        hardware=Hardware.detect(opts.device), versions=detect_versions(), config=opts, baseline=ctx.baseline,
        strategies=strategies, output_dir=str(out), steps=ctx.steps, tune_lr=ctx.tune,
        load_average=ctx.load.samples, devices=ctx.devices)
    results.recommendation = recommend(strategies, opts.priority, opts.gpu_memory, opts.tasks)
    results.warnings = warnings_for(results)
    write_json_atomic(out / "results.json", results.model_dump(mode="json"))
    md, html = write_reports(results, out)
    print_table(results, console)
    console.print(f"report: {html} (also {md}, results.json)")
    return results


def _baseline(ctx: "_Context", methods: list) -> dict[str, str]:
    """Run the baseline worker into `ctx.baseline` (and `ctx.reference`, the forgetting set every strategy's
    worker scores); returns {method: why it cannot apply to this model} for the methods left out."""
    what = "reference prose" if ctx.opts.task == "causal-lm" else "forgetting probe"
    ctx.progress.status(f"baseline: scoring the base model on its validation data and the {what}")
    reference = ctx.out / "runs" / "_baseline" / "reference.json"
    result = _run_worker("baseline", _baseline_job(ctx.opts, reference, methods), reference.parent,
                         poll=ctx.load.tick, env=ctx.env_for(ctx.devices[0]))
    ctx.baseline = baseline_record(result)
    measured = ctx.baseline.reference_perplexity is not None or ctx.baseline.probe_accuracy is not None
    ctx.reference = reference if measured else None
    return result.get("not_applicable") or {}


class _Context:
    """What every strategy of one compare shares: options, output dir, baseline, budget, progress, load, and
    the devices the runs are spread over."""

    def __init__(self, opts: CompareOptions, out: Path, tune: bool):
        self.opts, self.out, self.tune = opts, out, tune
        self.baseline: Baseline | None = None
        self.reference: Path | None = None
        self.steps = opts.max_steps
        self.progress = None
        self.load = LoadSampler()
        self.reused: list[str] = []
        self.labels: list[str] = []  # every run's label, in the order of a sequential compare
        self.devices = opts.devices or [str(pick_device(opts.device))]  # each runs one worker at a time
        # a worker's environment on its device: only --devices narrows a worker's view to its GPU (a plain
        # --device cuda:1 reaches the run config as it is)
        self.env_for = worker_env if opts.devices else lambda device: {}
        self.stop = threading.Event()  # set when the compare stops: the running workers are killed

    def tick(self) -> None:
        """A worker's poll: stop it if the compare is stopping, and sample the load."""
        check(self.stop)
        self.load.tick()


def _compare_all(ctx: _Context, methods: list) -> dict[str, StrategyResult]:
    """Every strategy's lr search (with --tune-lr) and one fresh worker per seed, as jobs spread over the
    devices (`compare_schedule`: a seed after its search), then aggregated over seeds: {method: its record}."""
    opts, jobs, plans = ctx.opts, [], {}
    for m in methods:
        options, notes = auto_options(opts, m.name, ctx.baseline)
        lr, searched = opts.lr_for.get(m.name, m.default_lr), ctx.tune and m.name not in opts.lr_for
        plans[m.name] = notes
        if searched:
            jobs.append(Job((m.name, "lr"), functools.partial(_search, ctx, m, lr, options)))
        for i in range(opts.seeds):
            ctx.labels.append(_label(opts, m.name, i))
            jobs.append(Job((m.name, i), functools.partial(_seed_run, ctx, m, i, lr, options, searched),
                            after=(m.name, "lr") if searched else None))
    done = run_jobs(jobs, ctx.devices, ctx.stop)
    strategies = {}
    for m in methods:
        result = aggregate([done[(m.name, i)] for i in range(opts.seeds)])
        result.lr_search, result.notes = done.get((m.name, "lr")), plans[m.name] + result.notes
        if m.name in opts.lr_for and ctx.tune:
            result.notes.append(f"lr {opts.lr_for[m.name]:g} set by --lr-for; not searched")
        strategies[m.name] = result
    return strategies


def _label(opts: CompareOptions, name: str, i: int) -> str:
    return name if opts.seeds == 1 else f"{name} s{opts.seed + i}"


def _seed_run(ctx: _Context, method, i: int, lr: float, options: dict, searched: bool, device: str,
              done: dict) -> tuple[int, StrategyResult]:
    """Seed number `i` of a strategy on `device`, at its searched lr (from `done`) or `lr`."""
    if searched:
        lr = done[(method.name, "lr")].chosen_lr
    seed = ctx.opts.seed + i
    run_dir = ctx.out / "runs" / (method.name if i == 0 else f"{method.name}.seed-{seed}")
    cfg = strategy_config(ctx.opts, method, run_dir, steps=ctx.steps, lr=lr, seed=seed, options=options)
    return seed, _run_strategy(ctx, method, cfg, _label(ctx.opts, method.name, i), i == 0, device)


def _search(ctx: _Context, method, lr: float, options: dict, device: str, done: dict | None = None):
    """The lr search of one strategy on `device` (`tunelab.measure.lr_search`), extended beyond the grid's edge
    while its best lr lies there."""
    opts, steps = ctx.opts, search_steps(ctx.opts, ctx.steps)
    job_dir = ctx.out / "runs" / f"{method.name}.lr-search"

    def config_for(x: float, run_dir: Path):
        return strategy_config(opts, method, run_dir, steps=steps, lr=x, options=options)

    def worker(kind, job, job_dir, poll):
        return _run_worker(kind, job, job_dir, poll=lambda: (ctx.tick(), poll()), timeout_s=opts.timeout_s,
                           env=ctx.env_for(device))

    def bar_for(total: int, extension: int = 0):
        more = f"+{extension}" if extension else ""
        return ctx.progress.strategy(f"{method.name} lr{more}{_on(ctx, device)}", total, unplanned=extension > 0)

    lrs = grid(opts, lr)
    configs = [config_for(x, job_dir / f"lr-{x:g}") for x in lrs]
    points = extended_search(configs, config_for, opts.lr_grid, job_dir, worker, bar_for)
    return choose(lr, steps, opts.seed, points, lrs)


def _on(ctx: _Context, device: str) -> str:
    """' on cuda:1' in a progress label when the runs are spread over several devices."""
    return f" on {device}" if len(ctx.devices) > 1 else ""


def _run_strategy(ctx: _Context, method, cfg, label: str, tensor_peak: bool, device: str) -> StrategyResult:
    """Train one run of a strategy in a fresh worker on `device`, following its metrics for the display; never
    raises for its errors.

    A run that an earlier compare into the same output dir finished on the same job and inputs is reused (its
    label is added to `ctx.reused`); any other leftover run dir is removed first.
    """
    opts, run_dir = ctx.opts, Path(cfg.output)
    job = {"run": cfg.model_dump(mode="json"), "artifact": method.artifact,
           "reference_file": str(ctx.reference) if ctx.reference else None, "tensor_peak": tensor_peak}
    previous = reusable_result(run_dir, job)
    if previous is not None:
        ctx.reused.append(label)
        return strategy_record(method, cfg, run_dir, previous, ctx.baseline, opts.warmup_steps_excluded)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a leftover of an earlier compare into the same output dir
    follower = MetricsFollower(run_dir / "metrics.jsonl")
    with ctx.progress.strategy(label + _on(ctx, device), cfg.max_steps) as bar:
        def poll():
            ctx.tick()
            bar.update(follower.new_records())

        worker = _run_worker("strategy", job, run_dir, poll=poll, timeout_s=opts.timeout_s, nproc=opts.nproc,
                             env=ctx.env_for(device))
        bar.finish(worker.get("status") == "ok", worker.get("error"))
    return strategy_record(method, cfg, run_dir, worker, ctx.baseline, opts.warmup_steps_excluded)


def _baseline_job(opts: CompareOptions, reference_file: Path, methods: list) -> dict:
    run = strategy_config(opts, get_method("full"), reference_file.parent, steps=1)
    return {"run": run.model_dump(mode="json"), "reference_data": opts.reference_data,
            "reference_sequences": opts.reference_sequences, "reference_file": str(reference_file),
            "methods": [m.name for m in methods]}


def _tunelab_version() -> str:
    return tunelab.__version__


