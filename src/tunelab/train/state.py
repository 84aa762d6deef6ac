"""What a checkpoint holds, and putting a run back exactly where a checkpoint left it.

Files of `checkpoints/step-N/` (written atomically by `tunelab.train.checkpoint`):
- `trainable.safetensors`: every trainable parameter by qualified name: the method's `parameters(model, name)`
  (for `full`, the whole model) and those trained outside it (a classification head). Raw parameters, not the
  method's saved artifact form, so a method that folds its weights on save (prefix with its MLP) still resumes;
- `optimizer.pt`: optimizer and scheduler state dicts (torch.save; read back with `weights_only=True`);
- `state.json`: global step, data position, every RNG state, counters, and the result-affecting config.
"""

from __future__ import annotations

import io
import json
import pickle
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from tunelab.config import RunConfig
from tunelab.errors import ArtifactError, ConfigError
from tunelab.methods.base import Method, check_loaded
from tunelab.train import rng
from tunelab.train.batches import DataPosition
from tunelab.train import checkpoint
from tunelab.train.checkpoint import Writer


@dataclass
class TrainState:
    """The loop's counters that a checkpoint carries (everything else is rebuilt from the config)."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    nan_skipped: int = 0
    elapsed: float = 0.0  # wall seconds of training before this process (resumed runs)
    fingerprints: dict = field(default_factory=dict)  # the model and data by content (tunelab.fingerprint)


@dataclass
class Trainables:
    """The trainable state of a run: the method's adapter plus parameters trained outside it."""

    model: nn.Module
    method: Method
    name: str
    extra: dict[str, nn.Parameter]

    def parameters(self) -> dict[str, nn.Parameter]:
        """Every trainable parameter of the run, by qualified name."""
        return {**self.method.parameters(self.model, self.name), **self.extra}


def _cpu_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # own contiguous CPU copies: safetensors refuses tensors that share storage (tied embeddings in `full`)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def _tensor_writer(tensors: dict[str, torch.Tensor]) -> Writer:
    data = safetensors.torch.save(_cpu_copies(tensors))
    return lambda path: checkpoint.write_bytes(path, data)


def checkpoint_writers(t: Trainables, optimizer, scheduler, state: TrainState, cfg: RunConfig) -> dict[str, Writer]:
    """The files of a checkpoint of the run as it is now, as {file name: writer}."""
    buf = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buf)
    meta_bytes = json.dumps(state_meta(t, state, cfg)).encode()
    return {
        "trainable.safetensors": _tensor_writer(t.parameters()),
        "optimizer.pt": lambda path: checkpoint.write_bytes(path, buf.getvalue()),
        "state.json": lambda path: checkpoint.write_bytes(path, meta_bytes),
    }


def state_meta(t: Trainables, state: TrainState, cfg: RunConfig) -> dict:
    """What `state.json` holds: counters, data position, RNG states, and what a resume checks."""
    return {
        "step": state.step,
        "position": state.position.to_json(),
        "nan_skipped": state.nan_skipped,
        "elapsed": state.elapsed,
        "rng": rng.capture(),
        "method": t.method.name,
        "adapter_name": t.name,
        "result_hash": cfg.result_hash(),
        "result_values": cfg.result_values(),
        "fingerprints": state.fingerprints,
        "saved_at": time.time(),
    }


def read_meta(path: Path) -> dict:
    """The `state.json` of checkpoint dir `path`."""
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path / 'state.json'}: unreadable checkpoint state ({e})") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path / 'state.json'}: expected a JSON object, found {type(meta).__name__}")
    return meta


def check_config(meta: dict, cfg: RunConfig, path: Path) -> None:
    """Refuse to resume when a result-affecting key changed (unless `cfg.force`); the error lists them.

    The model and data are not compared by path spelling when the checkpoint has their fingerprints: `train`
    compares those by content once the data has been read (so bad data gets its own error first).
    """
    saved, now = dict(meta.get("result_values", {})), cfg.result_values()
    if meta.get("fingerprints"):
        for key in ("model", "data"):
            saved.pop(key, None), now.pop(key, None)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed and not cfg.force:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigError(f"{path}: cannot resume, result-affecting config changed ({detail}); "
                          f"pass --force to resume anyway")


def load_checkpoint(path: Path, t: Trainables, optimizer, scheduler, device: torch.device) -> TrainState:
    """Load weights, optimizer, scheduler and RNG states from checkpoint dir `path`; return the counters.

    A file that cannot be read as tunelab writes it (a corrupt safetensors file, an `optimizer.pt` holding
    anything but tensors and containers, a `state.json` that does not fit) is an `ArtifactError` naming it.
    `optimizer.pt` is read with `weights_only=True` and never unpickled otherwise.
    """
    meta = read_meta(path)
    params = t.parameters()
    saved = _read_trainable(path / "trainable.safetensors")
    check_loaded(params, saved, str(path / "trainable.safetensors"))
    opt = _read_optimizer(path / "optimizer.pt")
    try:
        state = TrainState(step=int(meta["step"]), position=DataPosition.from_json(meta["position"], str(path)),
                           nan_skipped=int(meta.get("nan_skipped", 0)), elapsed=float(meta.get("elapsed", 0.0)))
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        rng.restore(meta["rng"])
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        raise ArtifactError(f"{path}: checkpoint does not fit this run ({type(e).__name__}: {_first_line(e)}); "
                            f"expected state.json and optimizer.pt as tunelab writes them") from None
    with torch.no_grad():
        for qname, param in params.items():
            param.copy_(saved[qname])
    return state


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _read_trainable(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's `trainable.safetensors`; `ArtifactError` naming it when unreadable."""
    try:
        return safetensors.torch.load_file(file)
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{file}: not a readable safetensors file ({_first_line(e)})") from None


def _read_optimizer(file: Path) -> dict:
    """`optimizer.pt` with `weights_only=True` (no fallback): anything but tensors and containers is refused."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr; the error says it all
            warnings.simplefilter("ignore")
            opt = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ArtifactError(f"{file}: refused, not a weights-only torch file ({type(e).__name__}); expected the "
                            f"optimizer and scheduler state tunelab writes (it is never unpickled otherwise)") from None
    if not isinstance(opt, dict) or not {"optimizer", "scheduler"} <= set(opt):
        raise ArtifactError(f"{file}: expected a dict with optimizer and scheduler, found {type(opt).__name__}")
    return opt
