"""`run.json`: the resolved config and the run summary, written atomically at the end of a run."""

from __future__ import annotations

import math
import platform

import torch
import transformers
from torch import nn

import tunelab


THROUGHPUT_COUNTS = "non-pad input tokens per second, leaving out the first 2 optimizer steps of each process"


def versions() -> dict[str, str]:
    """Versions of tunelab, torch, transformers and Python."""
    return {"tunelab": tunelab.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def parameter_counts(model: nn.Module) -> dict[str, float]:
    """params_total (tied weights once), params_trainable and trainable_percent."""
    params = list(model.parameters())  # nn.Module.parameters() yields a shared (tied) parameter once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"params_total": total, "params_trainable": trainable,
            "trainable_percent": round(100.0 * trainable / total, 6) if total else 0.0}


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN/inf: non-finite numbers become null."""
    return value if value is not None and math.isfinite(value) else None


def eval_fields(result: dict | None) -> dict:
    """final_val_loss and val_perplexity / val_accuracy from an `evaluate` result (None when no val split)."""
    if not result:
        return {"final_val_loss": None}
    fields = {"final_val_loss": finite_or_none(result["loss"])}
    for key in ("perplexity", "accuracy"):
        if key in result:
            fields[f"val_{key}"] = finite_or_none(result[key])
    return fields
