"""Checks on an adapter before it is served: its config (method, task, rank) and mixed-batch support.

`inspect_adapter` reads only `adapter_config.json`; the weights are read by `tunelab.artifacts.load_adapter`.
`mixed_batch_ok` decides whether an adapter's rows may share a batch with other adapters' rows: a method that
declares `supports_mixed_batch = False` never does; otherwise a probe forward must show each row getting
exactly its own adapter, so a method that ignores `row_adapters` is batched alone instead of served wrong.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.methods.base import adapter_state
from tunelab.serve.errors import AdapterRejected

_PROBE_TOKENS = 6


def inspect_adapter(name: str, path: Path, *, max_rank: int, max_bytes: int | None = None) -> str:
    """Validate adapter `name`'s config for serving and return its method name.

    Raises `AdapterRejected` naming the adapter for an unreadable config, a method that cannot be served
    (a whole model, a classification adapter), a rank above `max_rank`, or a weights file over `max_bytes`.
    """
    from tunelab.artifacts.files import read_json, read_label_names
    from tunelab.artifacts.peft_format import CONFIG, WEIGHTS, method_for_config

    try:
        config = read_json(path / CONFIG)  # a whole-model dir has none: only adapters are served
        method = method_for_config(config, path / CONFIG).name
        labels = read_label_names(path)
    except TunelabError as err:
        raise AdapterRejected(f"adapter {name!r}: {public_message(err, path, name)}") from None
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM") or labels:
        raise AdapterRejected(f"adapter {name!r}: task_type {task!r} is not text generation; "
                              "expected CAUSAL_LM")
    rank = adapter_rank(config)
    if rank is not None and rank > max_rank:
        raise AdapterRejected(f"adapter {name!r}: rank {rank} is above the server limit --max-rank {max_rank}")
    weights = path / WEIGHTS
    if max_bytes is not None and weights.is_file() and weights.stat().st_size > max_bytes:
        raise AdapterRejected(f"adapter {name!r}: {WEIGHTS} has {weights.stat().st_size} bytes, more than the "
                              f"base model itself ({max_bytes}); expected a small adapter")
    return method


def adapter_rank(config: dict) -> int | None:
    """The largest LoRA-family rank in the config (`r` and any per-module `rank_pattern`); None if it has none."""
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    ranks = [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]
    return max(ranks) if ranks else None


def public_message(err: Exception, path: Path, name: str) -> str:
    """The error's first line with the adapter's directory shown as its public name (no server paths leak)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.replace(str(path.resolve()), name).replace(str(path), name)


@torch.inference_mode()
def mixed_batch_ok(model, method: str, key: str) -> bool:
    """Whether adapter `key` (just loaded) gives each row of a mixed batch exactly its own adapter.

    Compares one forward of two identical rows with `row_adapters = [key, None]` against the adapter alone
    and the base alone. Call with the model lock held. The adapter state is left with nothing active.
    """
    from tunelab.methods import get_method

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
    # a method ignoring row_adapters errs by the whole effect on one row; batching noise is far below 5% of it
    effect = float((alone - base).abs().max())
    tol = 0.05 * effect + 1e-5
    ok = (mixed[0] - alone).abs().max() <= tol and (mixed[1] - base).abs().max() <= tol
    return bool(effect > 1e-4 and ok)
