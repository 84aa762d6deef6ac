"""Prefix-tuning: trainable key/value prefixes of `n` virtual tokens in every self-attention layer.

Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL 2021.

Adapter `name` is a `PrefixEncoder` in the `ModuleDict` `prefix_encoder` on the top-level model. Its output is
one (n, layers * 2 * kv_dim) tensor in PEFT's flat layout: per virtual token, for each layer the key then the
value, each (kv_heads, head_dim) (kv_heads = the key/value heads, fewer than the query heads under grouped-query
attention). A forward pre-hook on the model fills a transformers `DynamicCache` with the per-layer prefixes
(B, kv_heads, n, head_dim) and passes it as the call's key/value cache, extends the attention mask with `n`
leading ones and shifts given position ids by `n` (see `virtual_tokens` for positions and generation). The
cache holds the prefix tensors themselves, so gradients reach them through attention.

With `prefix_projection` the prefixes are computed by PEFT's reparameterisation MLP
(embedding (n, kv_dim) -> Linear -> tanh -> Linear -> (n, layers * 2 * kv_dim)); the saved artifact holds the
computed prefixes (the MLP folded away), exactly as PEFT saves it, and loading gives a folded adapter for
inference (as PEFT; training it raises `ConfigError`). Without the MLP, loading copies into the live parameter
in place, so a run resumed from a checkpoint continues exactly.

Needs a model whose forward takes a key/value cache (`cache` / `past_key_values`). Encoder classifiers such as
BERT's do not in transformers 5.x: `inject` refuses them with a `ConfigError` (use `prompt` or `lora` there).
Gradient checkpointing drops the cache inside each layer, so training with it is refused too.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from pydantic import Field
from torch import nn
from transformers import DynamicCache

from tunelab.errors import ConfigError
from tunelab.methods import virtual_tokens as vt
from tunelab.methods.base import Method, MethodOptions, register
from tunelab.methods.kit import check_loaded, container
from tunelab.validation import parse_model

CONTAINER = "prefix_encoder"
SAVED_KEY = "prompt_embeddings"  # PEFT's key: the folded prefixes, (n, layers * 2 * kv_dim)


class PrefixOptions(MethodOptions):
    """`--set` options of `prefix`."""

    num_virtual_tokens: int = Field(default=20, gt=0)
    prefix_projection: bool = False
    encoder_hidden_size: int | None = Field(default=None, gt=0)  # the MLP's width; None: kv_dim (as PEFT)


class PrefixEncoder(nn.Module):
    """One adapter's prefixes; `forward()` returns them as (n, layers * 2 * kv_dim) in PEFT's flat layout."""

    def __init__(self, n: int, flat_dim: int, token_dim: int, hidden: int | None):
        super().__init__()
        self.folded = False  # prefixes loaded in place of the MLP: inference only (see `load`)
        if hidden is None:
            self.embedding = nn.Parameter(torch.randn(n, flat_dim))  # PEFT's nn.Embedding init: N(0, 1)
            self.transform = None
        else:
            self.embedding = nn.Parameter(torch.randn(n, token_dim))  # (n, kv_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, flat_dim))

    def forward(self) -> torch.Tensor:
        return self.embedding if self.transform is None else self.transform(self.embedding)

    @torch.no_grad()
    def load(self, prefixes: torch.Tensor) -> None:
        """Hold `prefixes` (n, flat_dim): copied in place (an optimizer holding the parameter keeps training it),
        or, with the MLP, in a parameter that replaces the MLP. Such a folded adapter is for inference, as in
        PEFT: the MLP it trained through is not in the file, so it cannot continue training (see `_pre_hook`)."""
        if self.transform is None and not self.folded:
            self.embedding.copy_(prefixes.to(device=self.embedding.device, dtype=self.embedding.dtype))
            return
        device = self.embedding.device
        self.transform, self.folded = None, True
        self.embedding = nn.Parameter(prefixes.detach().to(device=device, dtype=torch.float32).clone())


@register
class Prefix(Method):
    """Prefix-tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

    Trains per-layer key/value prefixes (2 * layers * n * kv_dim parameters), or the MLP that computes them.
    Saved as PEFT's PREFIX_TUNING.
    """

    name = "prefix"
    document_packing = False  # virtual tokens: positions and mask are not the data's (see Method)
    family = "input-side"
    trains = "per-layer key/value prefixes of virtual tokens"
    paper = "Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation"
    Options = PrefixOptions
    mergeable = False
    supports_mixed_batch = False  # the prefixes lengthen every row's key/value cache
    peft_type = "PREFIX_TUNING"
    peft_loadable = True
    default_lr = 1e-2  # prefixes train with large steps (PEFT's examples use 1e-2)
    saved_prefix = "base_model."  # PEFT's prompt-learning models wrap the base one level less deep

    def not_applicable(self, model: nn.Module) -> str | None:
        """An encoder-decoder model, or one whose forward takes no key/value cache (BERT encoders)."""
        return vt.unsupported(model, self.name) or _no_cache(model)

    def attach(self, model: nn.Module, options: PrefixOptions, name: str) -> list[str]:
        """Add prefixes `name`; return the self-attention modules they extend."""
        vt.refuse_unsupported(model, self.name)
        _refuse_no_cache(model)
        _refuse_checkpointing(model)
        layers, kv_dim = _dims(model)
        hidden = (options.encoder_hidden_size or kv_dim) if options.prefix_projection else None
        encoder = PrefixEncoder(options.num_virtual_tokens, layers * 2 * kv_dim, kv_dim, hidden)
        container(model, CONTAINER, nn.ModuleDict)[name] = encoder.to(model.get_input_embeddings().weight.device)
        vt.install_hooks(model, self.name, _pre_hook, _post_hook)
        return vt.attention_module_names(model)

    def weights(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        """The encoder's parameters: the prefixes, or the MLP and its input embedding."""
        return {f"{CONTAINER}.{name}.{q}": p for q, p in self._encoder(model, name).named_parameters()}

    def saved(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """`{"prompt_embeddings": (n, layers * 2 * kv_dim)}`: the computed prefixes, PEFT's layout."""
        with torch.no_grad():
            return {SAVED_KEY: self._encoder(model, name)().detach().float().cpu().clone()}

    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor], name: str) -> None:
        """Load saved prefixes (tunelab's or PEFT's); an adapter with the MLP becomes a folded one."""
        encoder = self._encoder(model, name)
        layers, kv_dim = _dims(model)
        expected = torch.empty(encoder.embedding.shape[0], layers * 2 * kv_dim, device="meta")
        check_loaded({SAVED_KEY: expected}, sd, f"prefix adapter '{name}'")
        super().load_state_dict(model, {k: v for k, v in sd.items() if k != SAVED_KEY}, name)
        encoder.load(sd[SAVED_KEY])

    def adapter_config(self, model: nn.Module, options: PrefixOptions, name: str) -> dict[str, Any]:
        """PEFT's PrefixTuningConfig fields (token_dim = kv_dim, num_attention_heads = kv heads, as PEFT)."""
        layers, _, kv_heads, _ = vt.attention_dims(model)
        _, kv_dim = _dims(model)
        n = self._encoder(model, name).embedding.shape[0]
        return {
            "peft_type": self.peft_type,
            **vt.peft_common_config(model, n, kv_dim, kv_heads, layers),
            "prefix_projection": options.prefix_projection,
            "encoder_hidden_size": options.encoder_hidden_size or kv_dim,
            "init_weights": None,
        }

    def options_from_config(self, config: dict[str, Any]) -> PrefixOptions:
        """Options from a PREFIX_TUNING `adapter_config.json` (ours or PEFT's)."""
        vt.check_peft_config(config, self.name)
        values = {k: config[k] for k in PrefixOptions.model_fields if config.get(k) is not None}
        return parse_model(self.Options, values, where="adapter_config.json")

    def detach(self, model: nn.Module, name: str) -> None:
        """Drop prefixes `name`; with the last one the hooks and the container go too."""
        vt.detach_adapter(model, CONTAINER, name, self.name)

    def own_trainable(self, model: nn.Module, options: PrefixOptions) -> int:
        """Analytic count: 2 * layers * n * kv_dim, or with `prefix_projection` the MLP and its input embedding."""
        layers, kv_dim = _dims(model)
        n, flat = options.num_virtual_tokens, layers * 2 * kv_dim
        if not options.prefix_projection:
            return n * flat
        hidden = options.encoder_hidden_size or kv_dim
        return n * kv_dim + (kv_dim * hidden + hidden) + (hidden * flat + flat)

    def _encoder(self, model: nn.Module, name: str) -> PrefixEncoder:
        return vt.adapter_of(model, CONTAINER, name, self.name)


def _dims(model: nn.Module) -> tuple[int, int]:
    """(layers, kv_dim) with kv_dim = key/value heads * head_dim."""
    layers, _, kv_heads, head_dim = vt.attention_dims(model)
    return layers, kv_heads * head_dim


def _no_cache(model: nn.Module) -> str | None:
    if vt.cache_kwarg(model) is not None:
        return None
    return (f"method 'prefix': {type(model).__name__} takes no key/value cache (cache / past_key_values) in "
            f"transformers {transformers.__version__}, and prefix-tuning needs one; use method 'prompt' or 'lora' "
            f"for this model")


def _refuse_no_cache(model: nn.Module) -> None:
    why = _no_cache(model)
    if why:
        raise ConfigError(why)


def _refuse_training(model: nn.Module, names: list[str], encoders: list[PrefixEncoder]) -> None:
    """Training needs the cache kept in every layer and, with the MLP, the MLP itself."""
    _refuse_checkpointing(model)
    folded = [a for a, e in zip(names, encoders) if e.folded]
    if folded:
        raise ConfigError(f"prefix adapter '{folded[0]}' holds prefixes loaded from a file, computed by an MLP "
                          "(prefix_projection=true) that the file does not keep, so it cannot train further; "
                          "train a new adapter, or use prefix_projection=false to continue from a file")


def _refuse_checkpointing(model: nn.Module) -> None:
    attr = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    if getattr(model, attr, False):
        raise ConfigError("method 'prefix': gradient checkpointing drops the key/value cache that holds the "
                          "prefixes; turn gradient_checkpointing off or use another method")


# --- the hook on the top-level model ------------------------------------------------------------------

def _pre_hook(model: nn.Module, args: tuple, kwargs: dict, hooks: vt.CallHooks) -> dict | None:
    held = container(model, CONTAINER)
    names = vt.active_names(model, held)
    if not names:
        return None
    kwargs = vt.call_kwargs(args, kwargs, Prefix.name)
    encoders = [held[a] for a in names]
    if model.training and torch.is_grad_enabled():
        _refuse_training(model, names, encoders)
    n = sum(e.embedding.shape[0] for e in encoders)
    if not vt.is_decode_step(kwargs):
        batch, _ = vt.batch_and_length(kwargs, Prefix.name)
        key, cache = vt.cache_of(kwargs)
        kwargs[key or vt.cache_kwarg(model)] = fill_cache(model, cache, encoders, batch)
        # a cache made here only carries the prefixes: when the caller asked for none, none is returned, so
        # that `generate(use_cache=False)` does not feed it back as if it held the whole sequence
        hooks.pending = cache is None and not vt.wants_cache(model, kwargs)
    vt.update(kwargs, "attention_mask", lambda m: vt.extend_mask(m, n, Prefix.name))
    vt.update(kwargs, "position_ids", lambda p: vt.shift_positions(p, n))
    return kwargs


def _post_hook(model: nn.Module, output, hooks: vt.CallHooks):
    if hooks.pending:
        vt.drop_cache(output)
    hooks.pending = None
    return output


def fill_cache(model: nn.Module, cache, encoders: list[PrefixEncoder], batch: int):
    """Put the prefixes of `encoders` (in order) into `cache` (a new `DynamicCache` when None); return it."""
    if cache is None:
        cache = DynamicCache(config=model.config)
    elif not isinstance(cache, DynamicCache):
        raise ConfigError(f"method 'prefix': expected a DynamicCache, found {type(cache).__name__} "
                          "(static and other fixed-size caches are not supported)")
    layers, _, kv_heads, head_dim = vt.attention_dims(model)
    dtype = model.get_input_embeddings().weight.dtype
    flat = torch.cat([e() for e in encoders]).to(dtype)  # (n, layers * 2 * kv_dim)
    # PEFT's layout, per token: (layer, key|value, kv_head, head_dim) -> (layers, 2, kv_heads, n, head_dim)
    kv = flat.view(-1, layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4)
    for layer in range(layers):
        key, value = (kv[layer, i].unsqueeze(0).expand(batch, -1, -1, -1) for i in (0, 1))  # (B, kv_heads, n, hd)
        cache.update(key, value, layer)
    return cache
