"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation",
arXiv:2402.09353).

The adapted weight is a magnitude times a direction: W' = m * (W + s·B·A) / ||W + s·B·A||_c, where ||.||_c is
the L2 norm of each output row over the input dim, shape (out,), and the magnitude m (out,) is trained beside A
and B, starting at ||W + s·B·A||_c = ||W||_c (B starts at zero). The norm is a constant for the gradient (detached),
as the paper's Sec. 4.3 suggests and PEFT does. The layer hook adds W'x - Wx to the base output:

    (m / n - 1) * W x + (m / n) * s * B A x        n = ||W + s·B·A||_c (detached)

where W x is the base output without its bias (recomputed on dropout(x) while the adapter's dropout is on in
training), exactly as PEFT. GPT-2's Conv1D is handled in the (out, in) layout. Merge writes W' into the weight
and keeps n to unmerge; a DoRA merge never stacks with another merge on the same layer.

Artifacts are PEFT's: `adapter_config.json` is a LoraConfig with `use_dora: true`, and the magnitude is saved as
`base_model.model.<path>.lora_magnitude_vector` beside lora_A / lora_B, so `PeftModel.from_pretrained` loads it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.methods.base import Method, register
from tunelab.methods.lora import LoRAFamily, RandomInitOptions, resolve_targets
from tunelab.methods.lora_layer import Variant, delta_weight, set_weight, weight_oi
from tunelab.methods.precision import adapter_input, in_autocast
from tunelab.modules import in_out_features

MAGNITUDE = "lora_magnitude_vector"


class DoRAOptions(RandomInitOptions):
    """`--set` options of `dora`: those of `lora`, with A initialised randomly (init default or gaussian)."""


def weight_norm(module: nn.Module, name: str, w: torch.Tensor) -> torch.Tensor:
    """||W + s·B·A||_c: the L2 norm of each output row (out,), with no gradient."""
    with torch.no_grad():
        return torch.linalg.norm(w + delta_weight(module, name), dim=1)


class DoRAVariant(Variant):
    """DoRA's per-layer output and merge (see the module docstring)."""

    exclusive_merge = True

    def output(self, module: nn.Module, name: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """(m / n - 1) * W x + (m / n) * s * B A x: x (..., in), base (..., out) -> (..., out).

        In fp32, or in the base output's dtype under autocast (the (out,) scale is cast, not the activations).
        """
        a, b, dropout = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
        w = weight_oi(module)  # (out, in) fp32
        dtype = base.dtype if in_autocast(x) else torch.float32
        scale = (module.lora_magnitude_vector[name] / weight_norm(module, name, w)).to(dtype)  # (out,)
        x = adapter_input(x, a.weight.dtype)
        if isinstance(dropout, nn.Identity) or not module.training:
            wx = base.to(dtype)  # the base output holds W x (+ bias)
            wx = wx if module.bias is None else wx - module.bias.to(dtype)
        else:
            x = dropout(x)
            wx = F.linear(x, w)  # W dropout(x), as the adapter sees it
        return (scale - 1) * wx + scale * b(a(x)) * module.lora_scaling[name]

    @torch.no_grad()
    def inference_scale(self, module: nn.Module, name: str) -> torch.Tensor:
        """m / n (out,), fp32: W' x = (m / n) * (W x + s B A x) with n = ||W + s·B·A||_c."""
        return module.lora_magnitude_vector[name] / weight_norm(module, name, weight_oi(module))

    @torch.no_grad()
    def merge(self, module: nn.Module, name: str) -> None:
        """W <- m / n * (W + s·B·A), keeping n for `unmerge`."""
        w = weight_oi(module) + delta_weight(module, name)
        norm = torch.linalg.norm(w, dim=1)
        module.lora_dora_norm[name] = norm
        set_weight(module, (module.lora_magnitude_vector[name] / norm)[:, None] * w)

    @torch.no_grad()
    def unmerge(self, module: nn.Module, name: str) -> None:
        """W <- W' * n / m - s·B·A."""
        factor = module.lora_magnitude_vector[name] / module.lora_dora_norm.pop(name)
        set_weight(module, weight_oi(module) / factor[:, None] - delta_weight(module, name))

    def detach(self, module: nn.Module, name: str) -> None:
        del module.lora_magnitude_vector[name]
        module.lora_dora_norm.pop(name, None)
        if not len(module.lora_magnitude_vector):
            del module.lora_magnitude_vector, module.lora_dora_norm


DORA = DoRAVariant()


@register
class DoRA(LoRAFamily, Method):
    """Weight-decomposed LoRA: a trained magnitude per output feature and a LoRA-adapted direction."""

    name = "dora"
    family = "reparameterisation"
    trains = "magnitude m and low-rank A, B beside target linears"
    paper = "Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation (arXiv:2402.09353)"
    Options = DoRAOptions
    mergeable = True
    supports_mixed_batch = True
    peft_type = "LORA"
    peft_loadable = True
    variant = DORA
    use_dora = True
    peft_fields = frozenset({"use_dora"})
    containers = ("lora_A", "lora_B", MAGNITUDE)

    def setup_layer(self, module: nn.Module, name: str, options: DoRAOptions) -> None:
        """Add the magnitude m = ||W + s·B·A||_c (out,), fp32 and trainable, to the layer."""
        if not hasattr(module, MAGNITUDE):
            module.add_module(MAGNITUDE, nn.ParameterDict())
            module.lora_dora_norm = {}  # name -> n at merge time
        module.lora_magnitude_vector[name] = nn.Parameter(weight_norm(module, name, weight_oi(module)))

    def own_trainable(self, model: nn.Module, options: DoRAOptions) -> int:
        """LoRA's count plus one magnitude per output feature of each target."""
        extra = sum(in_out_features(model.get_submodule(t))[1] for t in resolve_targets(model, options))
        return super().own_trainable(model, options) + extra
