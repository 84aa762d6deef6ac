"""`train(cfg)`: a whole run. Resume or fresh start, the loop, the final evaluation, the artifact, run.json."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path

from tunelab.artifacts import save_artifact
from tunelab.artifacts.recovery import recover
from tunelab.config import RunConfig
from tunelab.errors import ConfigError, PeerFailed, TunelabError
from tunelab.fingerprint import check_unchanged, fingerprints
from tunelab.train import checkpoint as ckpt
from tunelab.train import dist_checkpoint
from tunelab.train import distributed as dist
from tunelab.train.evaluate import evaluate
from tunelab.train.loop import CHECKPOINTS, Loop, LoopOutcome
from tunelab.train.memory import peak_memory, reset_peak
from tunelab.train.metrics import MetricsLog, NullMetrics, read_metrics
from tunelab.train.progress import ProgressBar
from tunelab.train.rundir import refuse_finished, run_lock
from tunelab.train.setup import Run, build_run
from tunelab.tracking import open_trackers
from tunelab.train.signals import TrainingInterrupted, stop_signals
from tunelab.train.state import TrainState, check_config, load_checkpoint, read_meta
from tunelab.jsonio import write_json_atomic
from tunelab.train.summary import THROUGHPUT_COUNTS, eval_fields, finite_or_none, parameter_counts, versions

log = logging.getLogger("tunelab.train")


def train(cfg: RunConfig, *, progress: bool = True) -> dict:
    """Fine-tune `cfg.model` on `cfg.data` with `cfg.method`; write metrics, checkpoints, artifact and run.json.

    With `cfg.resume`, continue from the newest complete checkpoint in `cfg.output/checkpoints` (on CPU the
    result is bit-identical to an uninterrupted run). A SIGTERM saves a checkpoint and returns
    `{"status": "interrupted", ...}`; a SIGINT saves one and raises `TrainingInterrupted`.

    Started by torchrun, every rank calls this (`train/distributed.py`): rank 0 alone holds the run dir and
    writes metrics, progress, run.json and the artifact; a failure of another rank stops this one with
    `PeerFailed` (that rank reports the cause).

    Returns:
        The run summary that is also written to `cfg.output/run.json` (`status` "completed").
    """
    world = dist.init_world(cfg.device, cfg.dist_timeout)
    if world.enabled:
        cfg = cfg.model_copy(update={"device": dist.rank_device(world, cfg.device)})
    try:
        with contextlib.ExitStack() as held:
            summary = _train_locked(cfg, Path(cfg.output), progress, world, held)
    except TunelabError:
        raise
    except Exception as e:
        if world.enabled and dist.is_peer_failure(e):
            raise PeerFailed(f"stopped: another rank failed ({(str(e).strip().splitlines() or [''])[0]})") from None
        raise
    return summary  # the process group stays for a next run in this process; the CLI leaves it at exit


def _train_locked(cfg: RunConfig, out: Path, progress: bool, world: dist.World, held: contextlib.ExitStack) -> dict:
    started = time.perf_counter()

    def check_output() -> tuple[Path | None, dict]:
        held.enter_context(run_lock(out, resume=cfg.resume))  # one writer per run dir, for the life of the run
        return prepare_output(cfg, out, out / CHECKPOINTS), fingerprints(cfg.model, cfg.data)

    resume_from, prints = dist.main_only(world, check_output)
    run = build_run(cfg, world)
    state = TrainState()
    if resume_from is not None:
        dist.main_only(world, lambda: check_unchanged(read_meta(resume_from).get("fingerprints"), prints, cfg.model,
                                                      cfg.data, str(resume_from), cfg.force))
        state = (dist_checkpoint.load(world, resume_from, run.trainables, run.optimizer, run.scheduler)
                 if world.enabled else
                 load_checkpoint(resume_from, run.trainables, run.optimizer, run.scheduler, run.device))
    state.fingerprints = prints
    reset_peak(run.device)
    resume_step = state.step if resume_from else None
    if world.is_main:
        trackers = open_trackers(cfg.report_to, out, cfg.model_dump(mode="json"), resume_step)
        metrics = MetricsLog(out / "metrics.jsonl", resume_step=resume_step, trackers=trackers)
    else:
        metrics = NullMetrics()
    try:
        with stop_signals(repeat_kills=not world.enabled) as flag, \
                ProgressBar(run.total_steps, state.step, progress and world.is_main) as bar:
            if resume_from is not None:
                bar.say(f"resuming from {resume_from} (step {state.step} of {run.total_steps})")
            loop = Loop(run, state, metrics, bar, flag)
            outcome = loop.run_all()
    finally:
        metrics.close()
    if outcome.signal_name is not None:
        return interrupted(cfg, state, outcome, world)
    return finish(run, state, outcome, loop.elapsed(), time.perf_counter() - started)


def prepare_output(cfg: RunConfig, out: Path, root: Path) -> Path | None:
    """Check the output dir before any model loads; return the checkpoint to resume from, if resuming.

    A fresh run refuses an output dir that already holds checkpoints (they would mix with the new run's) or a
    finished run, unless `cfg.overwrite`, which replaces them. Temp dirs of saves that died midway are removed
    either way, and a half-done artifact swap is finished or rolled back.
    """
    recover(out)
    if cfg.resume:
        return find_resume_checkpoint(cfg, out, root)
    ckpt.clean_stale(root)
    existing = ckpt.complete_steps(root)
    if existing and not cfg.overwrite:
        raise ConfigError(f"{root}: holds checkpoints of an earlier run (newest {existing[0].name}); pass --resume "
                          f"to continue it, or --overwrite to start over and delete them")
    refuse_finished(out, cfg.overwrite)
    if existing:
        shutil.rmtree(root)
    (out / "run.json").unlink(missing_ok=True)  # a summary of an earlier run must not describe this one
    return None


def find_resume_checkpoint(cfg: RunConfig, out: Path, root: Path) -> Path:
    """The newest complete checkpoint under `root`, after checking the config still matches it."""
    if not out.is_dir():
        raise ConfigError(f"{out}: cannot resume, the output directory does not exist")
    for stale in ckpt.clean_stale(root):
        log.warning("removed %s: a checkpoint save that did not finish", stale)
    path, skipped = ckpt.find_latest(root)
    for bad, why in skipped:
        log.warning("skipping checkpoint %s: %s", bad, why)
    if path is None:
        why = "; ".join(f"{p.name}: {reason}" for p, reason in skipped) or "none saved"
        raise ConfigError(f"{root}: cannot resume, no complete checkpoint ({why})")
    check_config(read_meta(path), cfg, path)
    return path


def interrupted(cfg: RunConfig, state: TrainState, outcome: LoopOutcome, world: dist.World) -> dict:
    """SIGTERM: the summary of a run stopped cleanly; SIGINT: raise `TrainingInterrupted`. Rank 0 alone says so."""
    message = (f"stopped by {outcome.signal_name} at step {state.step}; checkpoint saved to {outcome.checkpoint}; "
               f"continue with --resume")
    if outcome.signal_name == "SIGINT":
        raise TrainingInterrupted(message, step=state.step, checkpoint=outcome.checkpoint,
                                  signal_name=outcome.signal_name)
    if not world.is_main:
        return {"status": "interrupted", "rank": world.rank, "step": state.step}
    log.info(message)  # the caller shows `message` (the CLI prints it once); a warning here printed it twice
    return {"status": "interrupted", "signal": outcome.signal_name, "step": state.step,
            "checkpoint": outcome.checkpoint, "method": cfg.method, "message": message}


def final_eval(run: Run, outcome: LoopOutcome) -> dict | None:
    """The evaluation at the last step: the loop's, or (when a resume found nothing left to do) a fresh one."""
    if outcome.last_eval is not None or not run.dataset.val:
        return outcome.last_eval
    return evaluate(run.model, run.dataset.val, run.cfg.task, run.pad_id, run.cfg.batch_size,
                    max_batches=run.cfg.eval_batches)


def last_train_loss(metrics_path: Path) -> float | None:
    """The loss of the last logged training step."""
    losses = [r["loss"] for r in read_metrics(metrics_path) if "loss" in r]
    return losses[-1] if losses else None


def finish(run: Run, state: TrainState, outcome: LoopOutcome, train_seconds: float, wall: float) -> dict:
    """Save the artifact, then write run.json (its presence marks a finished run); returns the summary."""
    cfg, out = run.cfg, Path(run.cfg.output)
    result = final_eval(run, outcome)
    peaks = dist.gather_ints(run.world, peak_memory(run.device)[0])
    dist.consolidate(run.world, run.model, trainable_only=run.trainables.method.artifact == "adapter")
    if not run.world.is_main:
        return {"status": "completed", "rank": run.world.rank, "steps": state.step}
    artifact_bytes = save_artifact(run.model, run.loaded.tokenizer, cfg.adapter_name, out / "artifact",
                                   base_model=cfg.model, label_names=run.dataset.label_names)
    peak, source = peak_memory(run.device)
    summary = {
        "status": "completed",
        "config": cfg.model_dump(mode="json"),
        "method": cfg.method,
        "lr": run.lr,
        "steps": state.step,
        **parameter_counts(run.model),
        "peak_memory_bytes": peak,
        "peak_memory_source": source,
        "idle_rss_bytes": run.idle_rss_bytes,
        "tokens_per_second": finite_or_none(outcome.throughput.rate()),
        "tokens_per_second_counts": THROUGHPUT_COUNTS,
        "wall_seconds": round(wall, 3),  # this invocation of train(), loading and saving included
        "train_seconds": round(train_seconds, 3),  # time inside the loop, across resumes
        "artifact_bytes": artifact_bytes,
        "final_train_loss": finite_or_none(last_train_loss(out / "metrics.jsonl")),
        **eval_fields(result),
        "nan_skipped": state.nan_skipped,
        "data": {k: run.dataset.stats.get(k) for k in ("rows", "skipped_empty", "truncated", "dropped")}
        | {"train_examples": len(run.dataset.train), "val_examples": len(run.dataset.val)},
        "versions": versions(),
        "fingerprints": state.fingerprints,
        "device": str(run.device),
        "dtype": str(run.loaded.dtype).replace("torch.", ""),
    }
    if run.world.enabled:  # the peak that must fit is the largest rank's
        summary |= {"world_size": run.world.size, "strategy": run.world.strategy, "peak_memory_bytes": max(peaks),
                    "peak_memory_per_rank": peaks}
        if run.world.strategy == "fsdp":
            summary["keep_gathered"] = run.world.keep_gathered
    report = run.trainables.method.memory_report(run.model, cfg.adapter_name)
    if report is not None:  # methods that change how the base is stored (qlora: NF4 bytes saved)
        summary["memory_report"] = report
    write_json_atomic(out / "run.json", summary)
    return summary
