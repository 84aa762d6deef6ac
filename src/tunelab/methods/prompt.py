"""Prompt tuning: a trainable soft prompt of `n` virtual token embeddings in front of every input.

Lester, Al-Rfou & Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning", EMNLP 2021.

The soft prompt of adapter `name` is the parameter `prompt_embeddings.<name>` (shape (n, hidden)) in a
`ParameterDict` on the top-level model. A forward pre-hook on the model replaces `input_ids` by
`inputs_embeds = cat(soft_prompt, embed(input_ids))` and extends the attention mask (and `labels` with -100,
`token_type_ids` with 0); a forward hook strips the `n` virtual positions from the returned `logits` (and
`hidden_states`), so callers always get logits aligned with their own `input_ids`: (B, L, V). When `labels` are
passed, the model's own loss is PEFT's: it also scores the first token, predicted from the last virtual token.
Positions, generation with the KV cache and the prefill/decode rule are in `virtual_tokens`.

`init`: "random" (N(0, 1), as PEFT), "sample_vocab" (embeddings of random vocabulary tokens) or "text" (the
embeddings of `init_text`'s tokens, repeated or truncated to `n`, as PEFT's `PromptTuningInit.TEXT`). The text is
tokenized with the tokenizer at `tokenizer_name_or_path`, or, when that is unset, the one saved in the model's own
local directory (`model.name_or_path`, which is where tunelab's `load_model` reads models from); it is loaded
from local files only.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from transformers import AutoTokenizer

from tunelab.errors import ConfigError
from tunelab.methods import virtual_tokens as vt
from tunelab.methods.base import Method, MethodOptions, register
from tunelab.methods.kit import container
from tunelab.validation import parse_model

CONTAINER = "prompt_embeddings"
SAVED_KEY = "prompt_embeddings"  # PEFT's key in adapter_model.safetensors, shape (n, hidden)
PEFT_INIT = {"random": "RANDOM", "text": "TEXT", "sample_vocab": "SAMPLE_VOCAB"}


class PromptOptions(MethodOptions):
    """`--set` options of `prompt`."""

    num_virtual_tokens: int = Field(default=20, gt=0)
    init: Literal["random", "text", "sample_vocab"] = "random"
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None

    @model_validator(mode="after")
    def _text_init_has_text(self) -> "PromptOptions":
        if self.init == "text" and not self.init_text:
            raise ValueError("init='text' needs a non-empty init_text")
        return self


@register
class Prompt(Method):
    """Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

    Only the soft prompt trains: `num_virtual_tokens * hidden` parameters. Saved as PEFT's PROMPT_TUNING.
    """

    name = "prompt"
    document_packing = False  # virtual tokens: positions and mask are not the data's (see Method)
    family = "input-side"
    trains = "a soft prompt of virtual token embeddings"
    paper = "Lester, Al-Rfou & Constant 2021, The Power of Scale for Parameter-Efficient Prompt Tuning"
    Options = PromptOptions
    mergeable = False
    supports_mixed_batch = False  # the soft prompt lengthens every row of the batch
    peft_type = "PROMPT_TUNING"
    peft_loadable = True
    default_lr = 3e-2  # soft prompts need a large step (Lester et al. use 0.3 with Adafactor; PEFT 3e-2)
    saved_prefix = "base_model."  # PEFT's prompt-learning models wrap the base one level less deep

    def not_applicable(self, model: nn.Module) -> str | None:
        """An encoder-decoder model."""
        return vt.unsupported(model, self.name)

    def attach(self, model: nn.Module, options: PromptOptions, name: str) -> list[str]:
        """Add soft prompt `name` (see the module docstring); return the input embedding it extends."""
        vt.refuse_unsupported(model, self.name)
        prompt = initial_prompt(model, options)  # (n, hidden), float32
        container(model, CONTAINER, nn.ParameterDict)[name] = nn.Parameter(prompt)
        vt.install_hooks(model, self.name, _pre_hook, _post_hook, first=True)
        return [vt.module_name(model, model.get_input_embeddings())]

    def weights(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        """`{"prompt_embeddings.<name>": soft prompt}`."""
        return {f"{CONTAINER}.{name}": self._prompt(model, name)}

    def tensors(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The live soft prompt under PEFT's saved key: `prompt_embeddings` (n, hidden)."""
        return {SAVED_KEY: self._prompt(model, name)}

    def adapter_config(self, model: nn.Module, options: PromptOptions, name: str) -> dict[str, Any]:
        """PEFT's PromptTuningConfig fields."""
        layers, num_heads, _, _ = vt.attention_dims(model)
        n, hidden = self._prompt(model, name).shape
        text = options.init == "text"
        return {
            "peft_type": self.peft_type,
            **vt.peft_common_config(model, n, hidden, num_heads, layers),
            "prompt_tuning_init": PEFT_INIT[options.init],
            "prompt_tuning_init_text": options.init_text if text else None,
            "tokenizer_name_or_path": tokenizer_path(model, options) if text else None,
            "tokenizer_kwargs": None,
        }

    def options_from_config(self, config: dict[str, Any]) -> PromptOptions:
        """Options from a PROMPT_TUNING `adapter_config.json`.

        The initialisation is not carried over (`init` is "random"): the saved soft prompt replaces it, and
        loading must not need the tokenizer the prompt was once initialised from.
        """
        vt.check_peft_config(config, self.name)
        values = {"num_virtual_tokens": config.get("num_virtual_tokens", 20)}
        return parse_model(self.Options, values, where="adapter_config.json")

    def detach(self, model: nn.Module, name: str) -> None:
        """Drop soft prompt `name`; with the last one the hooks and the container go too."""
        vt.detach_adapter(model, CONTAINER, name, self.name)

    def own_trainable(self, model: nn.Module, options: PromptOptions) -> int:
        """Analytic count: num_virtual_tokens * hidden."""
        return options.num_virtual_tokens * model.get_input_embeddings().weight.shape[1]

    def _prompt(self, model: nn.Module, name: str) -> nn.Parameter:
        return vt.adapter_of(model, CONTAINER, name, self.name)


# --- initialisation -------------------------------------------------------------------------------------

def initial_prompt(model: nn.Module, options: PromptOptions) -> torch.Tensor:
    """The starting soft prompt, (num_virtual_tokens, hidden) in float32 on the embedding's device."""
    weight = model.get_input_embeddings().weight  # (vocab, hidden)
    n = options.num_virtual_tokens
    if options.init == "random":
        return torch.randn(n, weight.shape[1], device=weight.device)  # PEFT's nn.Embedding init: N(0, 1)
    if options.init == "sample_vocab":
        ids = torch.randint(0, weight.shape[0], (n,), device=weight.device)
    else:
        ids = torch.tensor(text_token_ids(model, options), device=weight.device)
    with torch.no_grad():
        return model.get_input_embeddings()(ids).detach().float().clone()


def tokenizer_path(model: nn.Module, options: PromptOptions) -> str:
    """Where the tokenizer for `init='text'` is read from (see the module docstring)."""
    path = options.tokenizer_name_or_path or getattr(model, "name_or_path", "")
    if not path:
        raise ConfigError("prompt: init='text' needs a tokenizer: set tokenizer_name_or_path to a local tokenizer "
                          "dir, or load the model from a local dir that holds its tokenizer")
    return str(path)


def text_token_ids(model: nn.Module, options: PromptOptions) -> list[int]:
    """`init_text`'s token ids, repeated or truncated to num_virtual_tokens (PEFT's PromptTuningInit.TEXT)."""
    path = tokenizer_path(model, options)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"prompt: tokenizer_name_or_path '{path}': expected a local tokenizer dir, "
                          f"none could be loaded ({type(e).__name__})") from None
    ids = tokenizer(options.init_text)["input_ids"]
    if not ids:
        raise ConfigError(f"prompt: init_text {options.init_text!r} gives no tokens")
    n = options.num_virtual_tokens
    return (ids * math.ceil(n / len(ids)))[:n]


# --- hooks on the top-level model ----------------------------------------------------------------------

def _pre_hook(model: nn.Module, args: tuple, kwargs: dict, hooks: vt.CallHooks) -> dict | None:
    held = container(model, CONTAINER)
    names = vt.active_names(model, held)
    if not names:
        return None
    kwargs = vt.call_kwargs(args, kwargs, Prompt.name)
    prompts = [held[a] for a in names]
    n = sum(p.shape[0] for p in prompts)
    if vt.is_decode_step(kwargs):
        # the cache already holds the soft prompt: only the mask and the positions must count it
        vt.update(kwargs, "attention_mask", lambda m: vt.extend_mask(m, n, Prompt.name))
        vt.update(kwargs, "position_ids", lambda p: vt.shift_positions(p, n))
        return kwargs
    return _prepend(model, kwargs, hooks, torch.cat(prompts), n)


def _prepend(model: nn.Module, kwargs: dict, hooks: vt.CallHooks, prompt: torch.Tensor, n: int) -> dict:
    """Prefill: put the soft prompt (n, h) in front of the input embeddings and stretch the per-token inputs."""
    batch, length = vt.batch_and_length(kwargs, Prompt.name)
    ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)  # (B, L, h)
    prompt = prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, n, h)
    kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, n + L, h)
    vt.update(kwargs, "attention_mask", lambda m: vt.extend_mask(m, n, Prompt.name))
    vt.update(kwargs, "position_ids", lambda p: prepend_positions(p, n))
    for key, fill in (("labels", -100), ("token_type_ids", 0)):
        vt.update(kwargs, key, lambda x, fill=fill: _left_fill(x, n, fill, length))
    hooks.pending = (n, length)
    return kwargs


def prepend_positions(position_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Virtual tokens at 0..n-1, user tokens from n: (..., L) -> (..., n + L)."""
    virtual = torch.arange(n, dtype=position_ids.dtype, device=position_ids.device)
    virtual = virtual.expand(*position_ids.shape[:-1], n)
    return torch.cat([virtual, position_ids + n], dim=-1)


def _left_fill(x: torch.Tensor, n: int, fill: int, length: int) -> torch.Tensor:
    """(B, L) -> (B, n + L) with `fill` in front; per-sequence values such as class labels (B,) stay."""
    if x.dim() != 2 or x.shape[1] != length:
        return x
    return torch.cat([x.new_full((x.shape[0], n), fill), x], dim=1)


def _post_hook(model: nn.Module, output, hooks: vt.CallHooks):
    if hooks.pending is None:  # no soft prompt was prepended in this call
        return None
    n, length = hooks.pending
    hooks.pending = None
    return strip_virtual(output, n, length)


def strip_virtual(output, n: int, length: int):
    """Keep the last `length` positions of token-aligned outputs: logits (B, n + L, V) -> (B, L, V).

    Logits computed for the last k positions only (`logits_to_keep`, as `generate` asks) are trimmed the same
    way when k > L; classification logits (B, C) are left alone.
    """
    def trim(t):
        if torch.is_tensor(t) and t.dim() == 3 and t.shape[1] > length:
            return t[:, -length:]
        return t

    if isinstance(output, tuple):
        return tuple(trim(t) for t in output)
    if output.get("logits") is not None:
        output["logits"] = trim(output["logits"])
    if output.get("hidden_states") is not None:
        output["hidden_states"] = tuple(h[:, n:] if h.shape[1] == n + length else h for h in output["hidden_states"])
    return output
