"""The one training loop, its checkpoints (atomic, exactly resumable), evaluation and run summary.

Public API: `train(cfg)`, `evaluate(model, examples, task, pad_id, batch_size)`,
`causal_lm_loss_sum(logits, labels)`, and `TrainingInterrupted` (raised after a SIGINT checkpoint).
"""

from tunelab.train.evaluate import evaluate
from tunelab.train.loss import causal_lm_loss_sum
from tunelab.train.run import train
from tunelab.train.signals import TrainingInterrupted

__all__ = ["train", "evaluate", "causal_lm_loss_sum", "TrainingInterrupted"]
