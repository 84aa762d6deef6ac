"""Full fine-tuning: every weight of the model trains, embeddings and heads included.

The baseline the parameter-efficient methods are measured against (Howard & Ruder 2018, ULMFiT; Devlin et al.
2019, BERT). Nothing is attached to the model; the "adapter" is the model itself, so the artifact is a whole
HF model dir, there is nothing to merge, and it cannot be combined with other adapters.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.errors import ArtifactError, ConfigError
from tunelab.methods import register
from tunelab.methods.base import Method, MethodOptions, add_adapter, adapter_state, check_loaded, forget_adapter


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
    peft_type = None
    peft_loadable = False
    artifact = "model"

    def inject(self, model: nn.Module, options: FullOptions, name: str) -> list[str]:
        """Make every parameter trainable; touches no module, so returns []."""
        add_adapter(model, self, name, options, [])  # refuses a second full adapter or any other adapter
        for p in model.parameters():
            p.requires_grad_(True)
        return []

    def _check(self, model: nn.Module, name: str) -> None:
        if adapter_state(model).methods.get(name) != self.name:
            raise ConfigError(f"no full adapter named {name!r} in this model")

    def parameters(self, model: nn.Module, name: str) -> dict[str, nn.Parameter]:
        """All named parameters of the model (tied weights once)."""
        self._check(model, name)
        return dict(model.named_parameters())

    def state_dict(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The model's own state dict, with plain HF keys."""
        self._check(model, name)
        return model.state_dict()

    @torch.no_grad()
    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor], name: str) -> None:
        """Load a whole-model state dict; a tied weight may be saved under any one of its names."""
        self._check(model, name)
        groups = _alias_groups(model)
        resolved = {}
        for names in groups:
            given = next((n for n in names if n in sd), names[0])
            resolved[names[0]] = sd.get(given)
        expected = {names[0]: t for names, t in groups.items()}
        check_loaded(expected, {k: v for k, v in resolved.items() if v is not None}, f"full model {name!r}")
        known = {n for names in groups for n in names}
        extra = sorted(set(sd) - known)
        if extra:
            raise ArtifactError(f"full model {name!r}: unexpected keys {', '.join(extra[:5])} "
                                f"(a different architecture?)")
        for key, t in expected.items():
            t.copy_(resolved[key])

    def merge(self, model: nn.Module, name: str) -> None:
        raise ConfigError("method 'full' trains the base weights themselves: there is nothing to merge, "
                          "its artifact is already a plain model")

    unmerge = merge

    def remove(self, model: nn.Module, name: str) -> None:
        """Forget the adapter record; the trained weights are the model's own and stay."""
        self._check(model, name)
        forget_adapter(model, name)

    def expected_trainable(self, model: nn.Module, options: FullOptions) -> int:
        """Every parameter of the model, tied weights counted once."""
        return sum(p.numel() for p in model.parameters())


def _alias_groups(model: nn.Module) -> dict[tuple[str, ...], torch.Tensor]:
    """State-dict entries grouped by shared storage (tied weights): (name, alias, ...) -> the live tensor."""
    by_ptr: dict[tuple, list[str]] = {}
    tensors = model.state_dict(keep_vars=True)
    for key, t in tensors.items():
        by_ptr.setdefault((t.data_ptr(), t.dtype, tuple(t.shape)), []).append(key)
    return {tuple(keys): tensors[keys[0]] for keys in by_ptr.values()}
