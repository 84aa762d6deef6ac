"""Numbers an adapter must not hold: NaN or infinite weights, or a NaN or infinite config value.

Such an adapter loads without complaint, but every row it serves decodes garbage (greedy output is empty,
sampling fails), so the server refuses it at load, naming the tensor or the config key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tunelab.artifacts.peft_format import CONFIG, WEIGHTS
from tunelab.jsonio import read_json_object
from tunelab.serve.errors import AdapterRejected


def check_finite(name: str, path: Path) -> None:
    """Raise `AdapterRejected` naming the key or tensor when adapter `name`'s config or weights are not finite.

    Reads `adapter_config.json` (already checked to be a JSON object) and every tensor of the weights file, one
    tensor at a time; a missing or unreadable file is left to the loader's own error.
    """
    config = read_json_object(path / CONFIG, AdapterRejected) if (path / CONFIG).is_file() else {}
    key = non_finite_key(config)
    if key is not None:
        raise AdapterRejected(f"adapter {name!r}: {CONFIG} key {key!r} is not a finite number; expected finite "
                              "values (NaN and Infinity are refused)")
    if not (path / WEIGHTS).is_file():
        return
    try:
        with safe_open(str(path / WEIGHTS), framework="pt", device="cpu") as f:
            for tensor_name in f.keys():
                tensor = f.get_tensor(tensor_name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise AdapterRejected(f"adapter {name!r}: tensor {tensor_name!r} in {WEIGHTS} holds NaN or "
                                          "infinite values; expected finite weights")
    except AdapterRejected:
        raise
    except Exception:  # a corrupt file: the loader names it
        return


def non_finite_key(value: Any) -> str | None:
    """The dotted key of the first NaN or infinite number in a JSON value, or None (iterative: any depth)."""
    stack = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return where or "(top level)"
        children = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        stack.extend(reversed([(f"{where}.{k}" if where else str(k), v) for k, v in children]))
    return None
