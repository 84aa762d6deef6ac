"""tunelab's public Python API: thin functions over the internals, exported lazily by `tunelab/__init__.py`.

A bring-your-own-model flow, as with HF PEFT's `get_peft_model`:

    import tunelab
    model = AutoModelForCausalLM.from_pretrained(...)          # or tunelab.load_model("smollm2-135m").model
    model = tunelab.attach(model, "lora", r=8, target_modules="all-linear")
    tunelab.print_trainable_parameters(model)
    ...                                                        # any training loop
    tunelab.save(model, "out/adapter")
    fresh = tunelab.load_adapter(AutoModelForCausalLM.from_pretrained(...), "out/adapter")
    merged = tunelab.merge(fresh)                              # a plain HF model

`combine(["a", "b"], "ab", "ties", density=0.5)` builds one LoRA adapter from several (PEFT's
`add_weighted_adapter`). `train(RunConfig(...))` runs tunelab's own loop (what `tunelab train` does) and `compare(...)` its comparison.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from tunelab.artifacts import load_adapter as _load_adapter
from tunelab.artifacts import merge_and_unload, save_artifact
from tunelab.artifacts.combine import combine
from tunelab.config import RunConfig
from tunelab.errors import ConfigError
from tunelab.methods import get_method
from tunelab.methods.base import adapter_state
from tunelab.train import train as _train
from tunelab.train.summary import parameter_counts
from tunelab.validation import parse_model

__all__ = ["attach", "trainable_parameters", "print_trainable_parameters", "train", "save", "load_adapter",
           "merge", "compare", "combine", "RunConfig"]


def attach(model: nn.Module, method: str = "lora", name: str = "default", **options: Any) -> nn.Module:
    """Attach a new adapter of `method` to any HF `model` in place and return the model (PEFT's `get_peft_model`).

    Args:
        model: a transformers model (or any `nn.Module` with the modules the method targets).
        method: a registered method name (`tunelab methods` lists them): lora, dora, qlora, adapter, prefix, ...
        name: the adapter's name; several adapters may live on one model.
        **options: the method's options, as `--set` takes them (`r=8`, `alpha=16`, `target_modules=[...]`).
    Returns:
        `model`, with the new adapter the only active one and exactly its parameters trainable. The new
        modules follow the model's train/eval mode.
    """
    chosen = get_method(method)
    opts = parse_model(chosen.Options, options, where=f"options of method '{method}'")
    chosen.inject(model, opts, name)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of `model`; a tied weight counts once."""
    counts = parameter_counts(model)
    return int(counts["params_trainable"]), int(counts["params_total"])


def print_trainable_parameters(model: nn.Module) -> None:
    """Print `trainable params: N || all params: M || trainable%: P`, in PEFT's wording."""
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")


def train(config: RunConfig | dict[str, Any] | None = None, *, progress: bool = True, **values: Any) -> dict:
    """Run tunelab's training loop (as `tunelab train`) and return the run summary (also in `<output>/run.json`).

    `config` is a `RunConfig` or a dict of its keys; keyword `values` override it
    (`train(model="smollm2-135m", method="lora", max_steps=50, output="runs/a")`).
    """
    base = config.model_dump() if isinstance(config, RunConfig) else dict(config or {})
    cfg = parse_model(RunConfig, {**base, **values}, where="train")
    cfg.method_opts()  # the method's options fail here, before any model loads
    return _train(cfg, progress=progress)


def _only_adapter(model: nn.Module, name: str | None) -> str:
    """`name`, or the model's only active adapter when None."""
    if name is not None:
        return name
    state = adapter_state(model)
    candidates = list(state.active) or list(state.methods)
    if len(candidates) != 1:
        raise ConfigError(f"name: expected one of the model's adapters {sorted(state.methods) or '(none)'}, "
                          f"found none given")
    return candidates[0]


def save(model: nn.Module, out_dir: str | Path, name: str | None = None, *, tokenizer=None,
         base_model: str | None = None, label_names: list[str] | None = None) -> int:
    """Write adapter `name` (default: the only active one) to `out_dir`; return the bytes written.

    Adapter methods write PEFT's layout (`PeftModel.from_pretrained` and `AutoPeftModel*` load it); `full` writes
    an HF model dir (pass `tokenizer` to include it). `base_model` (a local dir or an alias) is recorded as the
    base the adapter belongs to; by default the model's own `name_or_path`.
    """
    return save_artifact(model, tokenizer, _only_adapter(model, name), out_dir, base_model=base_model,
                         label_names=label_names)


def load_adapter(model: nn.Module, adapter_dir: str | Path, name: str = "default") -> nn.Module:
    """Load an adapter saved by tunelab or HF PEFT into `model` as `name`; return the model.

    The adapter becomes the only active one and follows the model's train/eval mode.
    """
    _load_adapter(model, adapter_dir, name)
    return model


def merge(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold adapter `name` (default: the only active one) into the base weights and remove it: a plain HF model."""
    return merge_and_unload(model, _only_adapter(model, name))


def compare(**values: Any):
    """Train and measure several strategies side by side (as `tunelab compare`); returns `CompareResults`.

    Keys are `tunelab compare`'s options (`model`, `data`, `methods="lora,ia3"`, `max_steps`, `output`, ...).
    """
    from tunelab.measure.compare import build_options, run_compare

    return run_compare(build_options(values))
