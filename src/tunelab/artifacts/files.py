"""Reading and writing the files of an artifact: JSON, safetensors, and tunelab's small sidecar file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from tunelab.errors import ArtifactError
from tunelab.jsonio import read_json_object
from tunelab.methods.heads import head_names

# tunelab's own notes on an artifact (which method wrote it, the label names of a classifier). Loaders of the
# HF ecosystem ignore this file; everything they need is in their own files.
SIDECAR = "tunelab.json"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; `ArtifactError` naming the file when it is missing, not JSON, nested too
    deeply or not an object."""
    return read_json_object(path, ArtifactError)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on CPU. A missing, truncated or corrupt file is an `ArtifactError`.

    safetensors checks the header against the file size before reading, so a lying header never allocates.
    """
    if not path.is_file():
        pickled = [p.name for p in path.parent.glob("*.bin")] if path.parent.is_dir() else []
        hint = f"; pickle-based {pickled[0]} is never loaded, convert it to safetensors" if pickled else ""
        raise ArtifactError(f"{path}: weights file not found{hint}")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None


def check_finite(tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor: they would turn every output into NaN."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ArtifactError(f"{source}: tensor {key} holds NaN or inf values; expected finite weights")


def check_finite_values(config: dict[str, Any], source: Path) -> None:
    """Refuse a config whose numbers (lora_alpha, dropout, ...) are NaN or infinite, naming the key."""
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ArtifactError(f"{source}: {key} is {value}; expected a finite number")


def write_sidecar(out_dir: Path, model, method: str, options: dict[str, Any], label_names: list[str] | None, *,
                  base_model: str | None = None) -> None:
    """Record the method, its options, the task, the label names and the base as the user named it (an alias
    stays an alias here; `adapter_config.json` holds the resolved dir) next to the artifact's own files."""
    task_type = "SEQ_CLS" if head_names(model) else "CAUSAL_LM"
    side = {"method": method, "options": options, "task_type": task_type,
            "label_names": list(label_names) if label_names else None}
    if base_model is not None:
        side["base_model"] = base_model
    write_json(out_dir / SIDECAR, side)


def read_sidecar(artifact_dir: Path) -> dict[str, Any]:
    """The sidecar's content, or {} for an artifact written by another tool."""
    path = Path(artifact_dir) / SIDECAR
    return read_json(path) if path.exists() else {}


def read_label_names(artifact_dir: str | Path) -> list[str] | None:
    """The classification label names saved with an artifact (None when it has none)."""
    return read_sidecar(Path(artifact_dir)).get("label_names")


def _one_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
