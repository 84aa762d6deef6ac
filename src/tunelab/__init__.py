"""tunelab: adapt pre-trained transformers with any fine-tuning strategy, and measure the trade-offs.

The public Python API (see `tunelab.api` and the README's "Python API"):
- `load_model(spec, task="causal-lm", ...) -> LoadedModel` (`.model`, `.tokenizer`): a local HF dir or an alias;
- `attach(model, "lora", r=8, ...) -> model`: a new adapter on any HF model (PEFT's `get_peft_model`);
- `print_trainable_parameters(model)`, `trainable_parameters(model) -> (trainable, total)`;
- `train(RunConfig(...) | dict, **values) -> summary`, `RunConfig`;
- `save(model, out_dir)` (also `save_adapter`), `load_adapter(model, dir) -> model`, `merge(model) -> model`;
- `combine(adapter_dirs, out_dir, method, weights=..., ...)`: several LoRA adapters into one;
- `set_active(model, names)`, `disabled(model)` (a context manager: the base alone), `compare(**options)`.

Names load on first use, so `import tunelab` stays fast (no torch or transformers import).
"""

import importlib as _importlib
import logging as _logging

__version__ = "0.1.0"

# transformers imports torchao (the NF4 base of qlora) whenever it is installed; on a CPU-only machine its
# optional CUDA extensions fail to load and it logs that at import, with a deprecation notice from torch's
# pytree. Neither affects tunelab, so keep them out of the user's terminal.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

# public name -> (module, attribute); resolved on first access by `__getattr__` below
_EXPORTS = {
    "load_model": ("tunelab.models", "load_model"),
    "LoadedModel": ("tunelab.models", "LoadedModel"),
    "RunConfig": ("tunelab.config", "RunConfig"),
    "set_active": ("tunelab.methods.base", "set_active"),
    "disabled": ("tunelab.methods.base", "disabled"),
    "save_adapter": ("tunelab.api", "save"),
    # the subpackage itself: importing it binds `tunelab.train` anyway, so it is callable as `api.train`
    "train": ("tunelab.train", None),
    **{name: ("tunelab.api", name) for name in (
        "attach", "trainable_parameters", "print_trainable_parameters", "save", "load_adapter",
        "merge", "compare", "combine")},
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = _importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
