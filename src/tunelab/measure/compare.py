"""`tunelab compare`: train every selected strategy on the same model, data and budget, measure each, recommend one.

Each strategy trains in a fresh interpreter (`python -m tunelab.measure.compare_worker strategy JOB RESULT`), so
memory figures do not leak between strategies; a baseline worker first checks the model and data and scores the
untouched base model on the reference prose. The parent follows each worker's `metrics.jsonl` for the progress
display, then gathers `run.json`, the metrics and the worker's own measurements (forgetting, attach time) into
`results.json`, and writes the reports.

Output dir layout: `results.json`, `report.md`, `report.html`, `plots/*.png`, and `runs/<strategy>/` (the train
output dir of each strategy, with `worker.log` and the worker's `job.json` / `result.json`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

import tunelab
from tunelab.artifacts import artifact_bytes
from tunelab.config import build_config, parse_set
from tunelab.errors import ArtifactError, ConfigError, TunelabError, closest
from tunelab.jsonio import read_json_object, write_json_atomic
from tunelab.measure.forgetting import forgetting_record
from tunelab.measure.plan import plan
from tunelab.measure.portability import portability_record
from tunelab.measure.recommend import recommend
from tunelab.measure.report import CompareProgress, print_table, write_reports
from tunelab.interrupts import PARENT_PID_ENV, raising_signals
from tunelab.measure.compare_reuse import remove_reports, reusable_result
from tunelab.measure.schema import (Baseline, CompareOptions, CompareResults, Hardware, StrategyResult,
                                    detect_versions)
from tunelab.methods import all_methods, get_method
from tunelab.models import pick_device
from tunelab.validation import parse_model

WORKER_MODULE = "tunelab.measure.compare_worker"  # `python -m tunelab.measure.compare_worker KIND JOB RESULT`


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


def build_options(values: dict) -> CompareOptions:
    """`CompareOptions` from CLI values: None means the default; `methods` may be "a,b,c"; `lr_for` and
    `options_for` may be the raw repeatable flags. Bad keys or values raise a one-line `ConfigError`."""
    values = {k: v for k, v in values.items() if v is not None}
    if isinstance(values.get("methods"), str):
        values["methods"] = [m.strip() for m in values["methods"].split(",") if m.strip()]
    if isinstance(values.get("lr_for"), list):
        values["lr_for"] = parse_lr_for(values["lr_for"])
    if isinstance(values.get("options_for"), list):
        values["options_for"] = parse_options_for(values["options_for"])
    return parse_model(CompareOptions, values, where="compare")


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


def strategy_config(opts: CompareOptions, method, run_dir: Path):
    """The validated `RunConfig` of one strategy: the shared budget plus its own learning rate and options.

    The learning rate is `--lr-for NAME=LR` when given, else the method's `default_lr` (one place for defaults).
    """
    values = dict(model=opts.model, data=opts.data, task=opts.task, method=method.name,
                  method_options=opts.options_for.get(method.name, {}), output=str(run_dir), seed=opts.seed,
                  max_steps=opts.max_steps, batch_size=opts.batch_size, seq_len=opts.seq_len,
                  lr=opts.lr_for.get(method.name, method.default_lr),
                  eval_batches=opts.eval_batches, device=opts.device, dtype=opts.dtype)
    return build_config({}, values, where=f"compare strategy '{method.name}'")


def run_compare(opts: CompareOptions, console=None) -> CompareResults:
    """Run the whole comparison and write results.json, report.md, report.html and plots/ into `opts.output`.

    Every option is checked before anything trains. A strategy that fails is recorded with its error and the
    others still run. Prints the trade-off table and the report's path on `console` (a rich Console).
    """
    console = console or Console(width=None if sys.stdout.isatty() else 220)  # a log file gets the whole table
    out = Path(opts.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out}: is a file, expected a directory")
    methods = select_methods(opts)
    configs = [strategy_config(opts, m, out / "runs" / m.name) for m in methods]
    out.mkdir(parents=True, exist_ok=True)
    remove_reports(out)  # an earlier compare's report must not sit beside this one's unfinished runs
    reused: list[str] = []
    with raising_signals(), CompareProgress(console, len(methods)) as progress:
        progress.status("baseline: scoring the base model on the reference prose")
        reference = out / "runs" / "_baseline" / "reference.json"
        baseline = baseline_record(_run_worker("baseline", _baseline_job(opts, reference), reference.parent))
        reference = reference if baseline.reference_perplexity is not None else None
        strategies = [_run_strategy(opts, method, cfg, baseline, reference, progress, reused)
                      for method, cfg in zip(methods, configs)]
    if reused:
        console.print(f"reused finished strategies (same config, model and data): {', '.join(reused)}")
    results = CompareResults(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), tunelab_version=_tunelab_version(),
        hardware=Hardware.detect(opts.device), versions=detect_versions(), config=opts, baseline=baseline,
        strategies=strategies, output_dir=str(out))
    results.recommendation = recommend(strategies, opts.priority, opts.gpu_memory, opts.tasks)
    write_json_atomic(out / "results.json", results.model_dump(mode="json"))
    md, html = write_reports(results, out)
    print_table(results, console)
    console.print(f"report: {html} (also {md}, results.json)")
    return results


def _run_strategy(opts: CompareOptions, method, cfg, baseline, reference: Path | None, progress,
                  reused: list[str]) -> StrategyResult:
    """Train one strategy in a fresh worker, following its metrics for the display; never raises for its errors.

    A strategy that an earlier compare into the same output dir finished on the same job and inputs is reused
    (its name is appended to `reused`); any other leftover run dir is removed first.
    """
    run_dir = Path(cfg.output)
    job = {"run": cfg.model_dump(mode="json"), "artifact": method.artifact,
           "reference_file": str(reference) if reference else None}
    previous = reusable_result(run_dir, job)
    if previous is not None:
        reused.append(method.name)
        return strategy_record(method, cfg, run_dir, previous, baseline, opts.warmup_steps_excluded)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a leftover of an earlier compare into the same output dir
    follower = MetricsFollower(run_dir / "metrics.jsonl")
    with progress.strategy(method.name, opts.max_steps) as bar:
        worker = _run_worker("strategy", job, run_dir, poll=lambda: bar.update(follower.new_records()),
                             timeout_s=opts.timeout_s, nproc=opts.nproc)
        bar.finish(worker.get("status") == "ok", worker.get("error"))
    return strategy_record(method, cfg, run_dir, worker, baseline, opts.warmup_steps_excluded)


def _baseline_job(opts: CompareOptions, reference_file: Path) -> dict:
    return {"model": opts.model, "data": opts.data, "task": opts.task, "dtype": opts.dtype, "device": opts.device,
            "seq_len": opts.seq_len, "batch_size": opts.batch_size, "reference_data": opts.reference_data,
            "reference_sequences": opts.reference_sequences, "reference_file": str(reference_file)}


def _run_worker(kind: str, job: dict, job_dir: Path, poll=None, timeout_s: float | None = None,
                nproc: int = 1) -> dict:
    """Run one worker in a fresh interpreter and return its result dict (status 'failed' with an error if it died).

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
           PARENT_PID_ENV: str(os.getpid()) if nproc == 1 else ""}
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


def _tunelab_version() -> str:
    return tunelab.__version__


# --- gathering one strategy's figures (parent side) ------------------------------------------------------

class MetricsFollower:
    """The records appended to a growing `metrics.jsonl` since the last call (complete lines only)."""

    def __init__(self, path: Path):
        self.path, self.offset = Path(path), 0

    def new_records(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next call
        self.offset += end
        return [r for r in (_json_line(line) for line in chunk[:end].splitlines()) if isinstance(r, dict)]


def _json_line(line: bytes):
    try:
        return json.loads(line)
    except ValueError:
        return None


def read_records(path: Path) -> list[dict]:
    """Every complete record of a `metrics.jsonl` ([] when it does not exist)."""
    return MetricsFollower(path).new_records()


def speed_from_metrics(records: list[dict], warmup_steps: int) -> tuple[float | None, float | None]:
    """(tokens/s, seconds) over the training steps after the first `warmup_steps`.

    Step records carry the step's non-pad input `tokens` and the loop's cumulative `elapsed` seconds, so the
    time is the last step's `elapsed` less the last warm-up step's. (None, None) when too few steps were logged.
    """
    steps = sorted((r for r in records if "loss" in r and "tokens" in r and "elapsed" in r), key=lambda r: r["step"])
    if len(steps) <= warmup_steps:
        return None, None
    measured = steps[warmup_steps:]
    seconds = steps[-1]["elapsed"] - (steps[warmup_steps - 1]["elapsed"] if warmup_steps else 0.0)
    tokens = sum(r["tokens"] for r in measured)
    return (tokens / seconds if seconds > 0 else None), seconds


def _peak_memory(summary: dict) -> tuple[int | None, str | None]:
    """The run's peak memory and where it comes from; on CPU the idle process's RSS is taken off the OS peak."""
    peak, source, idle = (summary.get(k) for k in ("peak_memory_bytes", "peak_memory_source", "idle_rss_bytes"))
    if peak is None or source is None or "cuda" in source:
        return peak, source
    if idle and "idle" not in source:
        return max(peak - idle, 0), f"{source} minus idle RSS"
    return peak, source


def strategy_record(method, cfg, run_dir: Path, worker: dict, baseline: Baseline, warmup_steps: int) -> StrategyResult:
    """One strategy's `StrategyResult`, from its run.json, metrics.jsonl and the worker's result."""
    notes = list(worker.get("notes", []))
    summary = _read_summary(run_dir / "run.json", notes)
    records = read_records(run_dir / "metrics.jsonl")
    tps, seconds = speed_from_metrics(records, warmup_steps)
    if tps is None and summary.get("tokens_per_second") is not None:
        tps, seconds = summary["tokens_per_second"], summary.get("train_seconds")
        notes.append(f"fewer than {warmup_steps + 1} logged steps: speed includes warm-up")
    peak, source = _peak_memory(summary)
    artifact = summary.get("artifact_bytes") or _artifact_size(run_dir / "artifact")
    before, after = baseline.reference_perplexity, worker.get("after_perplexity")
    return StrategyResult(
        name=method.name, method=method.name, family=method.family, status=worker.get("status", "failed"),
        error=worker.get("error"), lr=summary.get("lr", cfg.lr), method_options=cfg.method_options,
        params_total=summary.get("params_total"), params_trainable=summary.get("params_trainable"),
        trainable_percent=summary.get("trainable_percent"), peak_memory_bytes=peak, peak_memory_source=source,
        predicted_memory_bytes=_predicted_memory(cfg, notes), tokens_per_second=tps, wall_seconds=seconds,
        artifact_bytes=artifact, final_train_loss=summary.get("final_train_loss"),
        val_loss=summary.get("final_val_loss"), val_perplexity=summary.get("val_perplexity"),
        val_accuracy=summary.get("val_accuracy"),
        forgetting=forgetting_record(before, after) if before and after else None,
        portability=portability_record(method.artifact, artifact, baseline.base_bytes or 0,
                                       worker.get("attach_seconds"), worker.get("switch_seconds"))
        if artifact and (baseline.base_bytes or method.artifact == "model") else None,
        loss_curve=[(r["step"], r["loss"]) for r in records if r.get("loss") is not None],
        val_curve=[(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None],
        run_dir=str(run_dir), notes=notes)


def baseline_record(result: dict) -> Baseline:
    """The `Baseline` from the baseline worker's result; a bad model or data spec stops the compare here."""
    if result.get("status") != "ok":
        if result.get("user_error"):
            raise TunelabError(result["error"])
        return Baseline(error=result.get("error", "baseline worker failed"))
    return Baseline(**{k: result[k] for k in Baseline.model_fields if k in result})


def _predicted_memory(cfg, notes: list[str]) -> int | None:
    """`tunelab plan`'s estimate of this run's peak memory on the run's device, where it has one.

    The planner reads only the model's config, and the run's method options as `train --set` reads them
    (every option reaches the planner; the few that change memory but are not modelled are planned at their
    default, with a note in the plan).
    """
    device = "cuda" if pick_device(cfg.device).type == "cuda" else "cpu"
    try:
        result = plan(cfg.model, batch_size=cfg.batch_size, seq_len=cfg.seq_len, dtype=cfg.dtype, device=device,
                      options_for={cfg.method: cfg.method_options}, methods=[cfg.method], task=cfg.task)
    except Exception as e:  # a prediction must never cost the measurements
        notes.append(f"no memory prediction from tunelab plan: {str(e).splitlines()[0] if str(e) else e!r}")
        return None
    estimate = result.strategies[0]
    return estimate.total_bytes if estimate.supported else None


def _read_summary(path: Path, notes: list[str]) -> dict:
    """A strategy's run.json; {} when the run wrote none (it failed first), {} and a note when it is unreadable."""
    if not path.exists():
        return {}
    try:
        return read_json_object(path, ArtifactError)
    except ArtifactError as e:
        notes.append(f"run summary not read: {e}")
        return {}


def _artifact_size(path: Path) -> int | None:
    if not path.is_dir():
        return None

    return artifact_bytes(path)
