"""Shared plumbing of the input-side methods (`prompt`, `prefix`): hooks that rewrite the model call.

Both methods add `n` virtual tokens in front of the user's tokens. They never touch model code: a forward
pre-hook on the top-level model rewrites the call's keyword arguments (embeddings, key/value cache, attention
mask, position ids) and, for `prompt`, a forward hook trims the returned logits back to the user's positions.

Position convention (the same as HF PEFT, for parity): the virtual tokens take positions `0 .. n-1` and the
user's tokens follow from position `n`. Given `position_ids` (as `generate` passes) are shifted by `n`; when
none are given the model counts positions from the cache length, which already includes the `n` tokens.

A call is a *prefill* when the key/value cache it carries is absent or empty: the virtual tokens are added.
Otherwise it is a *decode* step of `generate` (the cache already holds the virtual tokens): only the 2D
attention mask gains `n` leading ones and the position ids shift by `n`. So greedy decoding with the KV cache
gives the same tokens as without it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tunelab.errors import ArtifactError, ConfigError
from tunelab.methods.base import check_saved_modules, peft_common
from tunelab.methods.kit import adapter_state, container

HOOKS_ATTR = "tunelab_input_hooks"
CACHE_KEYS = ("cache", "past_key_values")  # recent transformers 5.x name it `cache`, earlier ones `past_key_values`


@dataclass
class CallHooks:
    """The hook handles one input-side method holds on a model, and what its pre-hook did in the current call."""

    handles: list[Any] = field(default_factory=list)
    pending: Any = None  # what the pre-hook did in this call, for the forward hook; None: nothing


def install_hooks(model: nn.Module, method: str, pre_hook, post_hook=None, first: bool = False) -> CallHooks:
    """Register `method`'s call-rewriting hooks on the top-level model once; return its `CallHooks`.

    `pre_hook(model, args, kwargs, hooks) -> kwargs | None` (the new call, all keywords) and
    `post_hook(model, output, hooks) -> output | None`.
    `first=True` runs the pre-hook before hooks registered earlier (prompt embeddings must be in place before a
    prefix cache is filled, so that both methods see the same prefill/decode decision).
    """
    table = getattr(model, HOOKS_ATTR, None)
    if table is None:
        table = {}
        object.__setattr__(model, HOOKS_ATTR, table)  # plain attribute, not a submodule
    if method in table:
        return table[method]
    hooks = CallHooks()

    def pre(module, args, kwargs):
        hooks.pending = None
        new = pre_hook(module, args, kwargs, hooks)
        return None if new is None else ((), new)

    hooks.handles.append(model.register_forward_pre_hook(pre, with_kwargs=True, prepend=first))
    if post_hook is not None:
        hooks.handles.append(model.register_forward_hook(
            lambda module, args, kwargs, output: post_hook(module, output, hooks), with_kwargs=True))
    table[method] = hooks
    return hooks


def uninstall_hooks(model: nn.Module, method: str) -> None:
    """Remove `method`'s hooks from the model (when its last adapter goes)."""
    hooks = getattr(model, HOOKS_ATTR, {}).pop(method, None)
    for handle in hooks.handles if hooks else []:
        handle.remove()


def call_kwargs(args: tuple, kwargs: dict, method: str) -> dict:
    """The call's keyword arguments, with a positional `input_ids` (every HF model's first argument) folded in."""
    if len(args) > 1:
        raise ConfigError(f"method '{method}': call the model with keyword arguments beyond input_ids "
                          f"(found {len(args)} positional arguments)")
    return {"input_ids": args[0], **kwargs} if args else dict(kwargs)


def active_names(model: nn.Module, held: nn.Module | None) -> list[str]:
    """The active adapters held in `held` (one method's container, or None), in activation order.

    Virtual tokens change the sequence length of the whole batch, so these methods declare
    `supports_mixed_batch = False`: in a mixed batch none applies, and the mixed-batch guard (`kit.route`)
    refuses rows that name one.
    """
    state = adapter_state(model)
    if held is None or state.row_adapters is not None:
        return []
    return [a for a in state.active if a in held]


def cache_kwarg(model: nn.Module) -> str | None:
    """The name under which the model's forward takes a key/value cache, or None when it takes none."""
    params = inspect.signature(model.forward).parameters
    return next((key for key in CACHE_KEYS if key in params), None)


def drop_cache(output) -> None:
    """Remove the key/value cache from a model output (one the caller did not ask for)."""
    if isinstance(output, tuple):
        return
    for key in CACHE_KEYS:
        if key in list(output.keys()):  # not `output.get`: transformers warns on the old name's lookup
            output[key] = None


def wants_cache(model: nn.Module, kwargs: dict) -> bool:
    """Whether the call asks the model to return its key/value cache (`use_cache`, else the config's)."""
    use_cache = kwargs.get("use_cache")
    return bool(getattr(text_config(model), "use_cache", False) if use_cache is None else use_cache)


def cache_of(kwargs: dict) -> tuple[str | None, Any]:
    """(key, cache) of the call's key/value cache as the caller passed it; (None, None) when absent."""
    for key in CACHE_KEYS:
        if kwargs.get(key) is not None:
            return key, kwargs[key]
    return None, None


def is_decode_step(kwargs: dict) -> bool:
    """Whether the call continues a cache that already holds the virtual tokens (see module docstring)."""
    _, cache = cache_of(kwargs)
    return cache is not None and cache.get_seq_length() > 0


def batch_and_length(kwargs: dict, method: str) -> tuple[int, int]:
    """(batch, user sequence length) of the call, from `input_ids` or `inputs_embeds`."""
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None:
        raise ConfigError(f"method '{method}': the model call needs input_ids or inputs_embeds")
    return x.shape[0], x.shape[1]


def update(kwargs: dict, key: str, fn) -> None:
    """`kwargs[key] = fn(kwargs[key])` where the call passes a value for `key`."""
    if kwargs.get(key) is not None:
        kwargs[key] = fn(kwargs[key])


def extend_mask(mask: torch.Tensor | None, n: int, method: str) -> torch.Tensor | None:
    """Prepend `n` ones to a 2D attention mask: (B, L) -> (B, n + L). None (attend everywhere) stays None."""
    if mask is None or n == 0:
        return mask
    if mask.dim() != 2:
        raise ConfigError(f"method '{method}': expected a 2D attention_mask (batch, seq), found {mask.dim()}D")
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def shift_positions(position_ids: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """User positions move behind the `n` virtual tokens: (..., L) -> (..., L) + n."""
    return None if position_ids is None else position_ids + n


def text_config(model: nn.Module):
    """The (decoder) text config of the model."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_dims(model: nn.Module) -> tuple[int, int, int, int]:
    """(layers, attention heads, key/value heads, head_dim) of the model's self-attention."""
    cfg = text_config(model)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, heads, kv_heads, head_dim


def unsupported(model: nn.Module, method: str) -> str | None:
    """Why `method` cannot apply to `model`: encoder-decoder models (PEFT adds virtual tokens to both stacks
    there) are not supported. None when it can."""
    if getattr(model.config, "is_encoder_decoder", False):
        return (f"method '{method}' supports decoder-only and encoder-only models; {type(model).__name__} is an "
                f"encoder-decoder model")
    return None


def refuse_unsupported(model: nn.Module, method: str) -> None:
    """Raise `unsupported`'s reason as a ConfigError."""
    why = unsupported(model, method)
    if why:
        raise ConfigError(why)


def peft_common_config(model: nn.Module, n: int, token_dim: int, num_heads: int, layers: int) -> dict[str, Any]:
    """The `adapter_config.json` fields PEFT's prompt-learning configs share."""
    return {**peft_common(model), "num_virtual_tokens": n, "token_dim": token_dim, "num_transformer_submodules": 1,
            "num_attention_heads": num_heads, "num_layers": layers, "revision": None}


def check_peft_config(config: dict[str, Any], method: str) -> None:
    """Refuse prompt-learning configs tunelab cannot serve (encoder-decoder ones, other saved modules)."""
    submodules = config.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise ArtifactError(f"adapter_config.json: num_transformer_submodules {submodules} (encoder-decoder "
                            "virtual tokens) is not supported; expected 1")
    check_saved_modules(config, method)


def attention_module_names(model: nn.Module) -> list[str]:
    """Qualified names of the per-layer self-attention modules (what the key/value prefixes extend)."""
    names = [q for q, m in model.named_modules()
             if isinstance(getattr(m, "layer_idx", None), int) and "Attention" in type(m).__name__]
    return names or [""]


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The qualified name of `module` inside `model`."""
    return next((q for q, m in model.named_modules() if m is module), "")


def adapter_of(model: nn.Module, attr: str, name: str, method: str):
    """Adapter `name`'s entry in the container `attr`; `ConfigError` listing the method's adapters otherwise."""
    held = container(model, attr)
    if held is None or name not in held:
        raise ConfigError(f"no {method} adapter '{name}' on this model; {method} adapters: "
                          f"{', '.join(held or []) or 'none'}")
    return held[name]


def detach_adapter(model: nn.Module, attr: str, name: str, method: str) -> None:
    """Drop adapter `name`'s entry; with the method's last adapter, its container and hooks go too, leaving the
    base module tree as it was."""
    adapter_of(model, attr, name, method)
    held = container(model, attr)
    del held[name]
    if len(held) == 0:
        delattr(model, attr)
        uninstall_hooks(model, method)
