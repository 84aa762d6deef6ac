"""Checks on an adapter before it is served: what it holds (method, task, rank) and mixed-batch support.

`inspect_adapter` reads the adapter's configs through `tunelab.artifacts.inspect`, the same answer the loader
uses; the weights are read by `tunelab.artifacts.load_adapter`. It also decides which method serves it: the one
that wrote it, except for a method whose loading changes the stored base (`changes_base`, e.g. qlora's NF4
quantisation), which would change every other adapter's outputs on the shared base. Such an artifact is served as
the method its files alone select (`ArtifactInfo.files_method`: qlora's artifact is a plain LoRA, which loads on
the unquantised base, as HF PEFT loads it), and refused when its files select nothing else.
`mixed_batch_ok` decides whether an adapter's rows may share a batch with other adapters' rows: a method that
declares `supports_mixed_batch = False` never does; otherwise a probe forward must show each row getting
exactly its own adapter, so a method that ignores `row_adapters` is batched alone instead of served wrong.
"""

from __future__ import annotations

import logging

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.artifacts import inspect
from tunelab.artifacts.peft_format import WEIGHTS
from tunelab.errors import TunelabError
from tunelab.methods import get_method
from tunelab.methods.base import adapter_state
from tunelab.serve.errors import AdapterRejected

_PROBE_TOKENS = 6

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Servable:
    """An adapter that passed the checks: `method` wrote it, `served_as` is the method it is loaded with."""

    method: str
    served_as: str


def inspect_adapter(name: str, path: Path, *, max_rank: int, max_bytes: int | None = None) -> Servable:
    """Validate adapter `name` for serving and return which method wrote it and which serves it.

    Raises `AdapterRejected` naming the adapter for unreadable configs, a whole model, a classification
    adapter, a method that would change the shared base with no plain reading of its files, a rank above
    `max_rank`, or a weights file over `max_bytes`.
    """
    try:
        info = inspect(path)
    except TunelabError as err:
        raise AdapterRejected(f"adapter {name!r}: {public_message(err, path, name)}") from None
    if info.kind != "adapter":  # only adapters share the base; a whole model is served as --model
        raise AdapterRejected(f"adapter {name!r}: {name}/adapter_config.json: file not found; it is a whole "
                              f"model dir, serve it as --model")
    if info.task_type not in (None, "CAUSAL_LM") or info.label_names:
        raise AdapterRejected(f"adapter {name!r}: task_type {info.task_type!r} is not text generation; "
                              "expected CAUSAL_LM")
    if info.rank is not None and info.rank > max_rank:
        raise AdapterRejected(f"adapter {name!r}: rank {info.rank} is above the server limit --max-rank {max_rank}")
    weights = path / WEIGHTS
    if max_bytes is not None and weights.is_file() and weights.stat().st_size > max_bytes:
        raise AdapterRejected(f"adapter {name!r}: {WEIGHTS} has {weights.stat().st_size} bytes, more than the "
                              f"base model itself ({max_bytes}); expected a small adapter")
    return Servable(info.method, _serving_method(name, info.method, info.files_method))


def _serving_method(name: str, method: str, files_method: str) -> str:
    """The method that loads the adapter on the shared base without changing the base under other adapters."""
    if not get_method(method).changes_base:
        return method
    if get_method(files_method).changes_base:
        raise AdapterRejected(f"adapter {name!r}: method '{method}' changes the shared base model's weights "
                              "when loaded; expected an adapter that leaves the base as it is")
    return files_method


def public_message(err: Exception, path: Path, name: str, key: str | None = None) -> str:
    """The error's first line with the adapter's directory, and its internal `key` on the model (`serve_3`),
    shown as the public name the client gave (no server paths or internal keys leak)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = text.replace(str(path.resolve()), name).replace(str(path), name)
    return re.sub(rf"\b{re.escape(key)}\b", lambda _: name, text) if key else text


@torch.inference_mode()
def mixed_batch_ok(model, method: str, key: str) -> bool:
    """Whether adapter `key` (just loaded) gives each row of a mixed batch exactly its own adapter.

    Compares one forward of two identical rows with `row_adapters = [key, None]` against the adapter alone
    and the base alone. Call with the model lock held. The adapter state is left with nothing active.
    """
    if getattr(get_method(method), "supports_mixed_batch", True) is False:
        return False
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    ids = (torch.arange(1, _PROBE_TOKENS + 1, device=device) * 7919 % vocab).unsqueeze(0)  # (1, T)
    state = adapter_state(model)
    try:
        state.active, state.row_adapters = (key,), [key, None]
        mixed = model(input_ids=ids.repeat(2, 1)).logits.float()  # (2, T, V)
        state.row_adapters = None
        alone = model(input_ids=ids).logits.float()[0]
        state.active = ()
        base = model(input_ids=ids).logits.float()[0]
    except Exception:  # the method refuses per-row adapters (or fails on them): it is batched alone
        return False
    finally:
        state.active, state.row_adapters = (), None
    ok = rows_match(mixed, alone, base)
    if not ok and float(torch.linalg.vector_norm(alone - base)) > 1e-4:
        log.warning("adapter %r: a mixed batch did not give each row its own adapter; its requests are batched "
                    "alone", key)
    return ok


def rows_match(mixed: torch.Tensor, alone: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether row 0 of `mixed` (2, T, V) is the adapter's answer `alone` (T, V) and row 1 the base's `base`.

    A method ignoring row_adapters errs by the whole effect on one row, so each row must lie much nearer its own
    answer than the other one. Distances are L2 over every logit, not the largest entry: in bf16 the rounding of
    a batched forward reaches a few percent of a small adapter's largest change, and an adapter refused by a
    max-entry test was batched alone, so a mixed load ran one adapter at a time.
    """
    effect = float(torch.linalg.vector_norm(alone - base))
    worst = max(float(torch.linalg.vector_norm(mixed[0] - alone)), float(torch.linalg.vector_norm(mixed[1] - base)))
    return effect > 1e-4 and worst <= 0.25 * effect
