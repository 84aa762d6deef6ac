"""The options and the `results.json` schema of `tunelab compare`, as pydantic models.

`CompareOptions` is what the user asks for; `CompareResults` is what `results.json` holds: run metadata (hardware,
versions, the options), the baseline measured once on the base model, one `StrategyResult` per strategy, and the
recommendation. docs/compare.md documents every field; `SCHEMA_VERSION` changes when a field changes meaning.
"""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import psutil
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunelab.measure.plan import parse_memory

SCHEMA_VERSION = 2
TASK_COUNTS = (1, 10, 100)  # the K of "bytes needed to serve K tasks"
Priority = Literal["quality", "memory", "speed", "forgetting"]
Budget = Literal["steps", "epochs", "tokens"]
LR_GRID = (0.3, 1.0, 3.0)  # --tune-lr: factors of each method's default lr that the search tries

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CompareOptions(_Strict):
    """What to compare and under which constraints. The defaults are the embedded main job, sized to finish in
    about ten minutes on two CPU cores for every registered strategy."""

    model: str = "smollm2-135m"
    data: str = "default"
    task: Literal["causal-lm", "classification"] = "causal-lm"
    methods: list[str] | None = None  # None: every registered method, in registry order
    output: str = "runs/compare"
    columns: dict[str, str] | None = None  # as `train --columns`: tunelab's column name -> the data file's
    chat_template: str | None = None  # as `train --chat-template`
    # The shared budget: every strategy trains the same steps on the same batches. `budget` says which of
    # max_steps / epochs / tokens sets it; epochs and tokens are turned into steps from the training split.
    budget: Budget = "steps"
    max_steps: int = Field(default=20, gt=0)
    epochs: float = Field(default=1.0, gt=0)
    tokens: int | None = Field(default=None, gt=0)  # non-pad input tokens per strategy (budget tokens)
    batch_size: int = Field(default=4, gt=0)
    seq_len: int = Field(default=64, gt=0)
    seed: int = 0
    seeds: int = Field(default=1, gt=0)  # every strategy trains with seeds seed, seed+1, ..., seed+seeds-1
    # The learning-rate search: each strategy tries lr_grid x its lr on tune_fraction of the budget (seed
    # `seed`), and the lr with the best validation loss trains the full runs. None: on where the device is a GPU.
    tune_lr: bool | None = None
    lr_grid: list[float] = Field(default_factory=lambda: list(LR_GRID), min_length=1)
    tune_fraction: float = Field(default=0.25, gt=0, le=1)
    eval_batches: int | None = Field(default=8, gt=0)  # validation batches for the task-quality figures
    warmup_steps_excluded: int = Field(default=2, ge=0)  # first steps left out of tokens/s (allocation, caches)
    # Per-strategy learning rate (`--lr-for lora=3e-4`) and options (`--set-for lora.r=16`); else the method's default_lr.
    lr_for: dict[str, float] = Field(default_factory=dict)
    options_for: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Forgetting. causal-lm: perplexity on general prose the training never saw, first N sequences truncated to
    # seq_len. classification: a linear probe's accuracy on a general labelled task (`tunelab.measure.probe`).
    # None: the task's default, default:prose or default:topics (set when the options are checked).
    reference_data: str | None = None
    reference_sequences: int = Field(default=32, gt=0)
    # The user's constraints for the recommendation.
    gpu_memory: int | None = Field(default=None, gt=0)  # bytes; the CLI accepts '24GB'
    tasks: int = Field(default=1, gt=0)  # K: how many task-specific variants will be served
    priority: Priority = "quality"
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    master_weights: bool = True  # the runs' `--master-weights` (fp32 copies of weights trained in bf16/fp16)
    timeout_s: float | None = Field(default=None, gt=0)  # per strategy; a strategy past it is recorded as failed
    nproc: int = Field(default=1, gt=0)  # processes (GPUs) each strategy trains on, through torchrun
    # The devices the runs are spread over, one worker per device at a time ("cuda:0,cuda:1"; or ["cpu"]).
    # None: every run on `device`, one after the other. Given, it sets `device` to its kind (cpu or cuda).
    devices: list[str] | None = None

    @field_validator("gpu_memory", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        return None if v is None else parse_memory(v)

    @field_validator("lr_grid")
    @classmethod
    def _positive_factors(cls, v: list[float]) -> list[float]:
        if any(f <= 0 for f in v):
            raise ValueError("expected factors of the default lr above 0, such as [0.3, 1, 3]")
        return sorted(set(v))

    @field_validator("devices", mode="before")
    @classmethod
    def _device_list(cls, v: Any) -> Any:
        return [d.strip() for d in v.split(",") if d.strip()] if isinstance(v, str) else v

    @field_validator("devices")
    @classmethod
    def _distinct_devices(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        bad = [d for d in v if not re.fullmatch(r"cpu|cuda:\d+", d)]
        if not v or bad:
            raise ValueError(f"expected cpu, or distinct cuda:N such as cuda:0,cuda:1; "
                             f"{repr(bad[0]) + ' is not a device' if bad else 'none given'}")
        repeated = sorted({d for d in v if v.count(d) > 1})
        found = f"{', '.join(repeated)} listed more than once" if repeated else "cpu beside other devices"
        if repeated or ("cpu" in v and len(v) > 1):
            raise ValueError(f"expected 'cpu' alone (its cores are one device) or distinct cuda:N such as "
                             f"cuda:0,cuda:1; {found}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "CompareOptions":
        if self.reference_data is None:
            self.reference_data = "default:topics" if self.task == "classification" else "default:prose"
        if self.budget == "tokens" and self.tokens is None:
            raise ValueError("budget 'tokens' needs tokens (--tokens N): non-pad input tokens per strategy")
        if self.devices is not None:
            kind = "cpu" if self.devices == ["cpu"] else "cuda"
            if self.device not in ("auto", kind):
                raise ValueError(f"devices {','.join(self.devices)} and device '{self.device}' disagree; expected "
                                 f"device auto or {kind} (or no devices)")
            if kind == "cuda" and self.nproc > 1:
                raise ValueError(f"devices {','.join(self.devices)} with nproc {self.nproc}: expected one of them "
                                 f"(--nproc spreads one run over this process's GPUs; --devices spreads the runs)")
            self.device = kind
        return self


class Hardware(_Strict):
    """Where the measurements were taken."""

    cpu_model: str
    cpu_cores: int
    ram_bytes: int | None = None
    device: str  # "cpu" or "cuda"
    gpu_name: str | None = None
    gpu_memory_bytes: int | None = None

    @classmethod
    def detect(cls, device: str = "auto") -> "Hardware":
        """This machine: CPU model and cores, RAM, and the GPU that `device` selects (if any)."""
        use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
        props = torch.cuda.get_device_properties(torch.cuda.current_device()) if use_cuda else None
        return cls(cpu_model=_cpu_model(), cpu_cores=os.cpu_count() or 1, ram_bytes=_ram_bytes(),
                   device="cuda" if use_cuda else "cpu", gpu_name=props.name if props else None,
                   gpu_memory_bytes=props.total_memory if props else None)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _ram_bytes() -> int:
    return int(psutil.virtual_memory().total)


def detect_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that shape the measurements."""
    out = {"python": platform.python_version()}
    for dist in ("tunelab", "torch", "transformers", "safetensors", "peft", "accelerate"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


class Baseline(_Strict):
    """Measured once on the untouched base model, shared by every strategy."""

    model_path: str | None = None
    base_bytes: int | None = None  # the base model's bytes on disk (weights + config + tokenizer)
    # the base as the runs hold and save it: its weights in the run's dtype, plus its other files. Serving costs
    # count this one, so a bf16 full fine-tune is not set against an fp32 base file (None: as on disk)
    served_bytes: int | None = None
    reference_perplexity: float | None = None  # "before" perplexity on the reference prose
    # classification: the linear probe's held-out accuracy on the untouched model ("before"), and its split
    probe_accuracy: float | None = None
    probe_train_examples: int = 0
    probe_test_examples: int = 0
    probe_classes: int = 0
    reference_sequences: int = 0
    reference_tokens: int = 0
    # the untouched model on the same validation batches as every strategy's final figures
    val_loss: float | None = None
    val_perplexity: float | None = None
    val_accuracy: float | None = None
    bias_terms: bool | None = None  # whether the model has bias terms (bitfit trains norm weights if not)
    train_examples: int | None = None  # the training split, for budgets in epochs or tokens
    train_tokens: int | None = None  # non-pad input tokens in the training split
    error: str | None = None


class Spread(_Strict):
    """Mean and spread of one figure over seeds: min-max for fewer than 3 values, else a 95% t-interval."""

    n: int
    mean: float
    low: float
    high: float
    kind: Literal["single run", "min-max", "95% interval"]


class SeedRun(_Strict):
    """The figures of one seed of one strategy (what the statistics are computed from)."""

    seed: int
    status: Literal["ok", "failed"] = "ok"
    error: str | None = None
    run_dir: str | None = None
    values: dict[str, float | None] = Field(default_factory=dict)  # figure -> value (names as in `spread`)


class LrSearch(_Strict):
    """The learning-rate search of one strategy: each lr tried, its validation loss, and the one chosen."""

    default_lr: float
    steps: int  # the shortened budget each lr trained
    seed: int
    curve: list[tuple[float, float | None]] = Field(default_factory=list)  # (lr, val loss); None: it failed
    chosen_lr: float
    errors: dict[str, str] = Field(default_factory=dict)  # lr (as text) -> why it failed
    extended: list[float] = Field(default_factory=list)  # lrs tried beyond the grid (its best lay at an edge)


ForgettingMeasure = Literal["prose_perplexity", "probe_accuracy"]


class Forgetting(_Strict):
    """How much general knowledge training cost, before and after: perplexity on the reference prose (causal
    LM; higher after = forgotten) or a linear probe's accuracy on a general labelled task (classification;
    lower after = forgotten). `delta` is signed so that positive is worse for both."""

    measure: ForgettingMeasure = "prose_perplexity"
    before_perplexity: float | None = None
    after_perplexity: float | None = None
    before_accuracy: float | None = None
    after_accuracy: float | None = None
    delta: float  # perplexity: after - before; accuracy: before - after
    delta_percent: float  # 100 * delta / before

    @property
    def before(self) -> float:
        """The "before" figure of this measure."""
        return self.before_accuracy if self.measure == "probe_accuracy" else self.before_perplexity

    @property
    def after(self) -> float:
        """The "after" figure of this measure."""
        return self.after_accuracy if self.measure == "probe_accuracy" else self.after_perplexity


class Portability(_Strict):
    """What serving many tasks with this strategy costs, in bytes and in switching time."""

    artifact: Literal["adapter", "model"]
    bytes_per_task: int  # one artifact on disk
    base_bytes: int  # the shared base an adapter needs (0 for whole models: each carries its own)
    serve_bytes: dict[int, int]  # K -> bytes to serve K tasks: K models, or one base + K adapters
    attach_seconds: float | None = None  # adapter: load_adapter + set_active on a loaded base; model: load_model
    switch_seconds: float | None = None  # adapter: set_active between two loaded adapters


class StrategyResult(_Strict):
    """One strategy's measurements; `status` 'failed' keeps the error and whatever was measured before it;
    'not applicable' (the method cannot apply to this model, decided before anything trained) has the reason in
    `error` and no figures."""

    name: str
    method: str
    family: str = ""
    status: Literal["ok", "failed", "not applicable"] = "ok"
    error: str | None = None
    lr: float | None = None
    method_options: dict[str, Any] = Field(default_factory=dict)
    params_total: int | None = None
    params_trainable: int | None = None
    trainable_percent: float | None = None
    peak_memory_bytes: int | None = None
    peak_memory_source: str | None = None  # e.g. "cuda allocator peak" or "peak RSS minus idle RSS"
    # the allocator's tensor peak (what `tunelab plan` predicts): CUDA's max_memory_allocated on a GPU; on CPU
    # weights + the peak of the CPU allocator over 2 training steps at full batch x seq_len (profiler)
    tensor_peak_bytes: int | None = None
    predicted_memory_bytes: int | None = None  # `tunelab plan`'s estimate of the tensor peak, where it has one
    tokens_per_second: float | None = None  # warm-up steps excluded
    wall_seconds: float | None = None  # training loop time, warm-up steps excluded
    artifact_bytes: int | None = None
    final_train_loss: float | None = None
    val_loss: float | None = None
    val_perplexity: float | None = None
    val_accuracy: float | None = None
    forgetting: Forgetting | None = None
    portability: Portability | None = None
    loss_curve: list[tuple[int, float]] = Field(default_factory=list)  # (step, train loss)
    val_curve: list[tuple[int, float]] = Field(default_factory=list)  # (step, val loss)
    run_dir: str | None = None
    notes: list[str] = Field(default_factory=list)  # figures that could not be measured, and why
    # with several seeds the figures above are means over the seeds that finished; these hold the rest
    seed_runs: list[SeedRun] = Field(default_factory=list)
    spread: dict[str, Spread] = Field(default_factory=dict)  # figure -> mean and spread over seeds
    lr_search: LrSearch | None = None


class Recommendation(_Strict):
    """The strategy the documented rule picks (docs/compare.md), with its reasons as numbers."""

    strategy: str | None
    priority: Priority
    gpu_memory: int | None = None
    tasks: int = 1
    reasons: list[str] = Field(default_factory=list)
    ranking: list[str] = Field(default_factory=list)  # eligible strategies, best first
    excluded: dict[str, str] = Field(default_factory=dict)  # strategy -> why it was left out
    tied: list[str] = Field(default_factory=list)  # strategies indistinguishable from the pick (spread or 2%)


class CompareResults(_Strict):
    """The whole of `results.json`."""

    schema_version: int = SCHEMA_VERSION
    created: str  # ISO 8601, UTC
    tunelab_version: str
    hardware: Hardware
    versions: dict[str, str]
    config: CompareOptions
    baseline: Baseline
    strategies: list[StrategyResult]
    recommendation: Recommendation | None = None
    output_dir: str | None = None
    steps: int | None = None  # the budget in optimizer steps per strategy, whichever way it was given
    tune_lr: bool = False  # whether the learning rates were searched (else each method's default or --lr-for)
    load_average: list[float] = Field(default_factory=list)  # 1-minute load average, sampled while timing
    devices: list[str] = Field(default_factory=list)  # where the workers ran, one at a time on each
    warnings: list[str] = Field(default_factory=list)  # busy machine, budget too small, ...

    def strategy(self, name: str) -> StrategyResult:
        """The record of strategy `name` (KeyError if it was not compared)."""
        for s in self.strategies:
            if s.name == name:
                return s
        raise KeyError(name)
