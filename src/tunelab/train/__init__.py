"""The one training loop, its checkpoints (atomic, exactly resumable), evaluation and run summary.

Public API: `train(cfg)`, `evaluate(model, examples, task, pad_id, batch_size)`,
`causal_lm_loss_sum(logits, labels)`, and `TrainingInterrupted` (raised after a SIGINT checkpoint).
"""

import sys
import types

from tunelab.train.evaluate import evaluate
from tunelab.train.loss import causal_lm_loss_sum
from tunelab.train.run import train
from tunelab.train.signals import TrainingInterrupted

__all__ = ["train", "evaluate", "causal_lm_loss_sum", "TrainingInterrupted"]


class _TrainPackage(types.ModuleType):
    """This package, callable: `tunelab.train(cfg)` is the public `tunelab.api.train`.

    A submodule import binds the package to the name `tunelab.train`, so the public function of that name is the
    package itself; `tunelab.train.train(cfg)` stays the plain loop entry point.
    """

    def __call__(self, config=None, **values):
        from tunelab.api import train as public_train

        return public_train(config, **values)


sys.modules[__name__].__class__ = _TrainPackage
