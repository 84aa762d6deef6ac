"""Gathering a compare's figures on the parent side: one seed's run into a `StrategyResult`, the seeds of one
strategy into their means and spreads, and the baseline worker's result into the `Baseline`.

Per seed, the figures come from the run's `run.json` and `metrics.jsonl` and the worker's own measurements
(forgetting, attach time, the CPU tensor peak). Over seeds, every figure in `SEED_FIGURES` gets its mean (the
value the table and the recommendation use) and its spread (`tunelab.measure.stats`).
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.artifacts import artifact_bytes
from tunelab.errors import ArtifactError, TunelabError
from tunelab.jsonio import read_json_object
from tunelab.measure.forgetting import forgetting_record
from tunelab.measure.plan import plan
from tunelab.measure.portability import portability_record
from tunelab.measure.schema import Baseline, SeedRun, StrategyResult
from tunelab.measure.stats import spread
from tunelab.models import pick_device

# the figures measured on every seed; `after_perplexity` (causal LM), `after_accuracy` (the classification
# probe) and `forgetting_percent` come from `forgetting`
SEED_FIGURES = ("val_loss", "val_perplexity", "val_accuracy", "final_train_loss", "tokens_per_second",
                "wall_seconds", "peak_memory_bytes", "tensor_peak_bytes", "after_perplexity", "after_accuracy",
                "forgetting_percent")
INT_FIGURES = ("peak_memory_bytes", "tensor_peak_bytes")
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
    shared = baseline.served_bytes or baseline.base_bytes  # the base an adapter is served on, in the run's dtype
    return StrategyResult(
        name=method.name, method=method.name, family=method.family, status=worker.get("status", "failed"),
        error=worker.get("error"), lr=summary.get("lr", cfg.lr), method_options=cfg.method_options,
        params_total=summary.get("params_total"), params_trainable=summary.get("params_trainable"),
        trainable_percent=summary.get("trainable_percent"), peak_memory_bytes=peak, peak_memory_source=source,
        tensor_peak_bytes=peak if source and "cuda" in source else worker.get("tensor_peak_bytes"),
        predicted_memory_bytes=_predicted_memory(cfg, notes, summary.get("world_size") or 1,
                                                 summary.get("strategy"), summary.get("keep_gathered")),
        tokens_per_second=tps, wall_seconds=seconds,
        artifact_bytes=artifact, final_train_loss=summary.get("final_train_loss"),
        val_loss=summary.get("final_val_loss"), val_perplexity=summary.get("val_perplexity"),
        val_accuracy=summary.get("val_accuracy"),
        forgetting=_forgetting(baseline, worker),
        portability=portability_record(method.artifact, artifact, shared or 0,
                                       worker.get("attach_seconds"), worker.get("switch_seconds"))
        if artifact and (shared or method.artifact == "model") else None,
        loss_curve=[(r["step"], r["loss"]) for r in records if r.get("loss") is not None],
        val_curve=[(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None],
        run_dir=str(run_dir), notes=notes)


def _forgetting(baseline: Baseline, worker: dict):
    """The strategy's forgetting record: prose perplexity (causal LM) or the probe's accuracy (classification)."""
    if baseline.reference_perplexity and worker.get("after_perplexity"):
        return forgetting_record(baseline.reference_perplexity, worker["after_perplexity"])
    if baseline.probe_accuracy is not None and worker.get("after_accuracy") is not None:
        return forgetting_record(baseline.probe_accuracy, worker["after_accuracy"], "probe_accuracy")
    return None


def not_applicable_record(method, reason: str) -> StrategyResult:
    """The record of a strategy whose method cannot apply to the model: no run, the reason in `error`."""
    return StrategyResult(name=method.name, method=method.name, family=method.family, status="not applicable",
                          error=reason)


def baseline_record(result: dict) -> Baseline:
    """The `Baseline` from the baseline worker's result; a bad model or data spec stops the compare here."""
    if result.get("status") != "ok":
        if result.get("user_error"):
            raise TunelabError(result["error"])
        return Baseline(error=result.get("error", "baseline worker failed"))
    return Baseline(**{k: result[k] for k in Baseline.model_fields if k in result})


def _predicted_memory(cfg, notes: list[str], world_size: int = 1, strategy: str | None = None,
                      keep_gathered: bool | None = None) -> int | None:
    """`tunelab plan`'s estimate of this run's tensor peak on the run's device (per GPU, for the strategy the run
    took, under `compare --nproc`, and whether its FSDP2 blocks kept their gathered weights), where it has one.

    The planner reads only the model's config, and the run's method options as `train --set` reads them
    (every option reaches the planner; the few that change memory but are not modelled are planned at their
    default, with a note in the plan).
    """
    device = "cuda" if pick_device(cfg.device).type == "cuda" else "cpu"
    try:
        result = plan(cfg.model, batch_size=cfg.batch_size, seq_len=cfg.seq_len, dtype=cfg.dtype, device=device,
                      options_for={cfg.method: cfg.method_options}, methods=[cfg.method], task=cfg.task,
                      gradient_checkpointing=cfg.gradient_checkpointing, fused_loss=cfg.fused_loss,
                      offload_activations=cfg.offload_activations and device == "cuda",
                      master_weights=cfg.master_weights, nproc=world_size,
                      strategy=strategy if strategy in ("fsdp", "ddp") else "auto",
                      reshard_after_forward=cfg.reshard_after_forward if keep_gathered is None
                      else "never" if keep_gathered else "always")
        if cfg.gradient_checkpointing and cfg.checkpoint_every != 1:
            notes.append(f"tunelab plan models checkpoint_every=1; this run recomputes every "
                         f"{cfg.checkpoint_every}th block only, so it keeps more than planned")
    except Exception as e:  # a prediction must never cost the measurements
        notes.append(f"no memory prediction from tunelab plan: {str(e).splitlines()[0] if str(e) else e!r}")
        return None
    estimate = result.strategies[0]  # its tensor peak: what the allocator reports (total adds a CUDA allowance)
    return estimate.peak_tensor_bytes if estimate.supported else None


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


def seed_values(s: StrategyResult) -> dict[str, float | None]:
    """The `SEED_FIGURES` of one seed's record."""
    out = {k: getattr(s, k) for k in SEED_FIGURES if hasattr(s, k)}
    out["after_perplexity"] = s.forgetting.after_perplexity if s.forgetting else None
    out["after_accuracy"] = s.forgetting.after_accuracy if s.forgetting else None
    out["forgetting_percent"] = s.forgetting.delta_percent if s.forgetting else None
    return out


def aggregate(runs: list[tuple[int, StrategyResult]]) -> StrategyResult:
    """One strategy's record over its seeds: each figure's mean, with its spread in `spread`.

    Non-figure fields (parameters, artifact, portability, curves, run dir) are the first finished seed's; the
    memory figures of later seeds are measured in fresh workers too. The strategy fails only when every seed
    failed; a failed seed is noted and left out of the statistics.
    """
    seed_runs = [SeedRun(seed=seed, status=r.status, error=r.error, run_dir=r.run_dir, values=seed_values(r))
                 for seed, r in runs]
    ok = [r for _, r in runs if r.status == "ok"]
    first = (ok or [runs[0][1]])[0]
    out = first.model_copy(deep=True)
    out.seed_runs = seed_runs
    out.notes = list(dict.fromkeys(n for _, r in runs for n in r.notes))
    out.notes += [f"seed {sr.seed} failed: {sr.error}" for sr in seed_runs if sr.status != "ok" and ok]
    if not ok:
        return out
    spreads = {k: spread([seed_values(r)[k] for r in ok]) for k in SEED_FIGURES}
    out.spread = {k: v for k, v in spreads.items() if v is not None}
    for key, sp in out.spread.items():
        if key in StrategyResult.model_fields:
            setattr(out, key, round(sp.mean) if key in INT_FIGURES else sp.mean)
    key = "after_accuracy" if out.forgetting and out.forgetting.measure == "probe_accuracy" else "after_perplexity"
    if out.forgetting and key in out.spread:
        out.forgetting = forgetting_record(out.forgetting.before, out.spread[key].mean, out.forgetting.measure)
    return out
