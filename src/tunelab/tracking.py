"""Experiment tracking beside `metrics.jsonl`: TensorBoard event files and Weights & Biases runs.

`report_to` works as HF Trainer's: `tensorboard` writes event files (offline, through
`torch.utils.tensorboard`) under `<output>/tensorboard/`; `wandb` starts a run with the resolved config (its
mode, project and entity come from wandb's own environment: `WANDB_MODE=offline`, `WANDB_PROJECT`, ...; the
project defaults to `tunelab`) and files it under `<output>/wandb/`; `all` is every tracker that is installed;
`none` (or an empty list) is none. Every record `metrics.jsonl` gets also goes to each tracker, under HF
Trainer's tag names (`train/loss`, `train/learning_rate`, `eval/loss`, ...), at its optimizer step.

The trackers' packages are optional (the `tracking` extra), so they are imported when a tracker opens; this
module itself imports nothing heavy, because the run config checks `report_to` with it before any model loads.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

from tunelab.errors import ConfigError, closest

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the package it needs
TENSORBOARD_DIR = "tensorboard"
RENAMED = {"lr": "learning_rate"}  # tunelab's record keys that HF Trainer names otherwise


def installed(tracker: str) -> bool:
    """Whether the package `tracker` needs can be imported (nothing is imported to find out)."""
    return importlib.util.find_spec(TRACKERS[tracker]) is not None


def parse_report_to(value: str | list[str] | None) -> list[str]:
    """The trackers `value` names (`tensorboard,wandb`, `all`, `none`, or a list), each checked to be installed.

    Raises `ConfigError` naming `report_to` for an unknown tracker or one whose package is missing.
    """
    names = value.split(",") if isinstance(value, str) else list(value or [])
    names = [n.strip() for n in names if n.strip() and n.strip() != "none"]
    if "all" in names:
        return [t for t in TRACKERS if installed(t)]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"report_to: unknown tracker {name!r}{closest(name, TRACKERS)}; expected {', '.join(TRACKERS)}, all or none")
        if not installed(name):
            extra = " (pip install 'tunelab[tracking]')" if name == "tensorboard" else ""
            raise ConfigError(f"report_to: {name} is not installed{extra}; install it or leave it out")
    return list(dict.fromkeys(names))


def tag(key: str) -> str:
    """HF Trainer's tag for a `metrics.jsonl` key: `val_loss` -> `eval/loss`, `lr` -> `train/learning_rate`."""
    if key.startswith("val_"):
        return f"eval/{key[len('val_'):]}"
    return f"train/{RENAMED.get(key, key)}"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a record (its step left out) under their tags; a null or NaN loss is left out."""
    return {tag(k): float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Tracker(Protocol):
    """What `MetricsLog` calls for each record, and once at the end."""

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    """Event files under `<output>/tensorboard/`; on resume, events after the resumed step are purged."""

    def __init__(self, out: Path, config: dict[str, Any], resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR), purge_step=purge)
        if resume_step is None:
            self.writer.add_text("config", f"```\n{json.dumps(config, indent=1, default=str)}\n```", 0)

    def log(self, record: dict[str, Any]) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()  # a run killed later keeps every step logged so far, as metrics.jsonl does

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A wandb run holding the resolved config; each record is logged at its step."""

    def __init__(self, out: Path, config: dict[str, Any], resume_step: int | None):
        import wandb

        out.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(dir=str(out), config=config, name=out.resolve().name,
                              project=os.environ.get("WANDB_PROJECT", "tunelab"))

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


OPENERS = {"tensorboard": TensorBoard, "wandb": WandB}


def open_trackers(report_to: list[str], out: Path, config: dict[str, Any],
                  resume_step: int | None = None) -> list[Tracker]:
    """Start each tracker of `report_to` for the run in `out` (`resume_step`: the step a resume continues from)."""
    return [OPENERS[name](out, config, resume_step) for name in report_to]
