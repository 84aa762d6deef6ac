"""`tunelab eval`: loss and perplexity (or accuracy) of a base model, with or without an adapter."""

from __future__ import annotations

from pathlib import Path

from tunelab.artifacts import inspect, load_adapter
from tunelab.artifacts.peft_format import tokenizer_for
from tunelab.data import load_data
from tunelab.models import load_model
from tunelab.train import evaluate
from tunelab.train.evaluate import batch_count
from tunelab.train.progress import batch_progress


def evaluate_spec(model: str, data: str, *, adapter: Path | None = None, task: str = "causal-lm",
                  seq_len: int = 256, batch_size: int = 8, max_examples: int | None = None,
                  trust_remote_code: bool = False, progress: bool = False) -> dict:
    """Load `model` (+ `adapter`), read `data` and evaluate.

    `data="default"` (or `default:<name>`) evaluates the embedded set's validation split; a file is evaluated
    whole. `progress` shows a bar of the batches on stderr.

    Returns what was scored (`model`, `adapter` (None: the base model alone), `data`, `split`: "validation" or
    "all", `examples`) and its scores: `loss` and `perplexity`, or `loss` and `accuracy`.
    """
    label_names = inspect(adapter).label_names if adapter else None
    loaded = load_model(model, task=task, trust_remote_code=trust_remote_code, label_names=label_names)
    if adapter is not None:
        load_adapter(loaded.model, adapter)
        loaded.tokenizer = tokenizer_for(loaded.tokenizer, [adapter])  # an adapter's added tokens encode as one
    is_default = data == "default" or data.startswith("default:")
    dataset = load_data(data, loaded.tokenizer, task, seq_len, val_fraction=0.1 if is_default else 0.0,
                        label_names=label_names)
    examples = dataset.val if is_default else dataset.train
    examples = examples[:max_examples] if max_examples else examples
    with batch_progress("eval", batch_count(len(examples), batch_size), progress) as tick:
        result = evaluate(loaded.model, examples, task, loaded.pad_id, batch_size, on_batch=tick)
    return {"model": model, "adapter": str(adapter) if adapter is not None else None, "data": data,
            "split": "validation" if is_default else "all", "examples": len(examples), **result}
