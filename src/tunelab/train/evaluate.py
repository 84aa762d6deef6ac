"""Evaluation on held-out examples: token-weighted loss and perplexity, or loss and accuracy."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from tunelab.data import collate, forward_inputs
from tunelab.train.loss import task_loss_sum


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move every tensor of a collated batch to `device`."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def batch_count(n_examples: int, batch_size: int, max_batches: int | None = None) -> int:
    """How many batches `evaluate` runs over `n_examples` examples."""
    n = -(-n_examples // batch_size)
    return n if max_batches is None else min(n, max_batches)


def evaluate(model: nn.Module, examples: list[dict], task: str, pad_id: int, batch_size: int, *,
             max_batches: int | None = None, on_batch: Callable[[], None] | None = None) -> dict[str, float]:
    """Evaluate `model` on `examples` (in order) under `torch.no_grad` in eval mode; the mode is restored.

    Args:
        model: an HF causal-LM or sequence-classification model (adapters as currently active).
        examples: tunelab examples (`input_ids` + `labels` or `label`), as `tunelab.data` produces.
        task: "causal-lm" or "classification".
        pad_id: the padding token id for collation.
        batch_size: examples per forward pass.
        max_batches: evaluate only the first N batches (None: all).
        on_batch: called after each batch (a progress bar's advance; `batch_count` gives the total).

    Returns:
        causal-lm: {"loss", "perplexity"}, the loss being the mean over every target token of all examples
        (not a mean of batch means); classification: {"loss", "accuracy"}. Empty `examples` give NaNs.
    """
    was_training = model.training
    device = model_device(model)
    loss_sum, n_targets, correct = 0.0, 0, 0
    model.eval()
    try:
        with torch.no_grad():
            for i, start in enumerate(range(0, len(examples), batch_size)):
                if max_batches is not None and i >= max_batches:
                    break
                batch = to_device(collate(examples[start:start + batch_size], pad_id, task), device)
                logits = model(**forward_inputs(batch)).logits
                batch_sum, n = task_loss_sum(logits, batch["labels"], task)
                loss_sum, n_targets = loss_sum + float(batch_sum), n_targets + n
                if task == "classification":  # logits: (batch, classes)
                    correct += int((logits.argmax(-1) == batch["labels"]).sum())
                if on_batch is not None:
                    on_batch()
    finally:
        model.train(was_training)
    loss = loss_sum / n_targets if n_targets else float("nan")
    if task == "classification":
        return {"loss": loss, "accuracy": correct / n_targets if n_targets else float("nan")}
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)) if n_targets else float("nan")}

