"""Full fine-tuning: every weight of the model trains, embeddings and output layers included.

The baseline the parameter-efficient methods are measured against (Howard & Ruder 2018, ULMFiT; Devlin et al.
2019, BERT). Nothing is attached to the model; the "adapter" is the model itself, so the artifact is a whole
HF model dir, there is nothing to merge, and it cannot be combined with other adapters.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods.base import Method, MethodOptions, register
from tunelab.methods.kit import load_live


class FullOptions(MethodOptions):
    """`full` has no options."""


@register
class Full(Method):
    """Train every parameter (full fine-tuning; Howard & Ruder 2018, Devlin et al. 2019)."""

    default_lr = 2e-5  # every weight moves: the usual full fine-tuning step
    name = "full"
    family = "full"
    trains = "every weight"
    paper = "Howard & Ruder 2018, Universal Language Model Fine-tuning (arXiv:1801.06146)"
    Options = FullOptions
    mergeable = False
    supports_mixed_batch = False  # the trained weights are the model's own: every row gets them
    peft_type = None
    peft_loadable = False
    artifact = "model"

    def attach(self, model: nn.Module, options: FullOptions, name: str) -> list[str]:
        """Nothing to attach: every parameter trains (`inject` marks them). Touches no module, so returns []."""
        return []

    def weights(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        """All named parameters of the model (tied weights once)."""
        self.owned(model, name)
        return dict(model.named_parameters())

    def state_dict(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The model's own state dict, with plain HF keys."""
        self.owned(model, name)
        return model.state_dict()

    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor], name: str) -> None:
        """Load a whole-model state dict; a tied weight may be saved under any one of its names."""
        self.owned(model, name)
        groups = _alias_groups(model)
        given = {k: v for k, v in sd.items() if not any(k in names for names in groups)}  # unexpected keys
        for names in groups:
            alias = next((n for n in names if n in sd), None)
            if alias is not None:
                given[names[0]] = sd[alias]
        load_live({names[0]: t for names, t in groups.items()}, given, f"full model {name!r}")

    def fold(self, model: nn.Module, name: str, merged: bool) -> None:
        raise ConfigError("method 'full' trains the base weights themselves: there is nothing to merge, "
                          "its artifact is already a plain model")

    def detach(self, model: nn.Module, name: str) -> None:
        """Nothing to detach: the trained weights are the model's own and stay."""

    def own_trainable(self, model: nn.Module, options: FullOptions) -> int:
        """Every parameter of the model, tied weights counted once."""
        return sum(p.numel() for p in model.parameters())


def _alias_groups(model: nn.Module) -> dict[tuple[str, ...], torch.Tensor]:
    """State-dict entries grouped by shared storage (tied weights): (name, alias, ...) -> the live tensor."""
    by_ptr: dict[tuple, list[str]] = {}
    tensors = model.state_dict(keep_vars=True)
    for key, t in tensors.items():
        by_ptr.setdefault((t.data_ptr(), t.dtype, tuple(t.shape)), []).append(key)
    return {tuple(keys): tensors[keys[0]] for keys in by_ptr.values()}
