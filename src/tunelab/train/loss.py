"""Losses as sums, so that gradient accumulation can normalise by the target count of a whole window.

A window of micro-batches is one optimizer step. Each micro-batch contributes `loss_sum / window_targets`,
so the accumulated gradient equals the gradient of the mean loss over every target token of the window,
exactly as one large batch would give, whatever the padding and lengths of the micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.data.collate import forward_inputs

IGNORE_INDEX = -100


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Shifted next-token cross-entropy, summed over target tokens, computed in fp32.

    Args:
        logits: (batch, seq, vocab) model outputs; position t predicts token t+1.
        labels: (batch, seq) token ids aligned with the inputs (NOT shifted), `-100` where no loss falls.

    Returns:
        (loss_sum, n_tokens): the summed loss (a 0-dim fp32 tensor) and the number of target tokens.
    """
    shift_logits = logits[:, :-1, :].float()  # (batch, seq-1, vocab)
    shift_labels = labels[:, 1:].to(shift_logits.device)  # (batch, seq-1)
    loss_sum = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, int((shift_labels != IGNORE_INDEX).sum())


def classification_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over examples, in fp32. logits: (batch, classes); labels: (batch,) class ids."""
    loss_sum = F.cross_entropy(logits.float(), labels.to(logits.device), reduction="sum")
    return loss_sum, int(labels.numel())


def count_targets(batch: dict[str, torch.Tensor], task: str) -> int:
    """Targets a collated batch contributes to the loss: shifted non-ignored labels, or examples."""
    if task == "classification":
        return int(batch["labels"].numel())
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad input tokens of a collated batch (what throughput counts)."""
    return int(batch["attention_mask"].sum())


def batch_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], task: str, *,
                   fused: bool = False, liger: bool = False) -> tuple[torch.Tensor, int]:
    """Forward `batch` through `model` and return the task's summed loss and its target count.

    Labels are not passed to the model: the loss is computed here, as a sum, in fp32. With `fused` (causal-lm,
    a plain linear head), the head and the loss run chunk by chunk without full logits (`fused_loss`), through
    Liger-Kernel's kernel with `liger` where it is installed.
    """
    if fused and task == "causal-lm":
        from tunelab.train.fused_loss import fusable_head, fused_causal_lm_loss_sum

        head = fusable_head(getattr(model, "module", model))  # a DDP wrapper's model holds the head
        if head is not None:
            return fused_causal_lm_loss_sum(model, head, forward_inputs(batch), batch["labels"], liger=liger)
    out = model(**forward_inputs(batch))
    return task_loss_sum(out.logits, batch["labels"], task)


def task_loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, int]:
    """The summed loss of `task` ("causal-lm" or "classification") and its target count."""
    if task == "classification":
        return classification_loss_sum(logits, labels)
    return causal_lm_loss_sum(logits, labels)
