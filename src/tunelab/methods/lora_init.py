"""LoRA initialised from the base weight (PiSSA, OLoRA), and such adapters saved as a plain LoRA.

PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language
Models", arXiv:2404.02948): with W = U S V^T (fp32, (out, in)) and s the LoRA scaling, A = sqrt(S_r / s) V_r^T
(r, in) and B = U_r sqrt(S_r / s) (out, r), so s·B·A is the rank-r principal part of W, and the base weight
becomes the residual W - s·B·A. `pissa_niter_K` takes the r principal triplets from `torch.svd_lowrank` with K
subspace iterations instead of a full SVD (fast; random, so the run's seed makes it repeatable). As PEFT's
`init_lora_weights="pissa"` / `"pissa_niter_K"`.

OLoRA (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", arXiv:2406.01775):
with W = Q R (QR of the (out, in) weight), B = Q[:, :r] and A = R[:r]; the base becomes W - s·B·A. As PEFT's
`init_lora_weights="olora"` (which does not divide by the scaling; neither does tunelab).

Both change the base weight in memory: while training, the frozen base is the residual, bit-identical from the
first step on. The initial factors A0, B0 stay on the layer as buffers (`lora_initial`), and make the rest work
on the *original* base:
- while the adapter is off (disabled, or another adapter active), the layer hook adds s·B0·A0 x back, so the
  layer computes the original base;
- `to_plain_lora` (the method's `state_dict`) converts the adapter as PEFT's
  `save_pretrained(path_initial_model_for_weight_conversion=...)` does: A' = [A; A0] (2r, in) and
  B' = [B, -B0] (out, 2r), so that W + s·B'·A' = (W - s·B0·A0) + s·B·A, the trained layer. `converted_config`
  doubles r and alpha (alpha * sqrt 2 under rsLoRA: the scaling stays) and writes `init_lora_weights: true`. The
  artifact is a plain LoRA that loads on the original base, in PEFT and in tunelab;
- `from_plain_lora` (loading into a PiSSA/OLoRA adapter, e.g. from a checkpoint) reads that rank-2r form, and
  also PEFT's unconverted rank-r form (A, B trained on the residual, which is recomputed here from the base);
- `restore_base` (on remove) adds s·B0·A0 back to the weight of an unmerged adapter: the original base up to
  rounding. A merged adapter leaves the trained weight W - s·B0·A0 + s·B·A (merge and unload).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods.kit import peft_key
from tunelab.methods.lora_layer import InitialFactors, add_to_weight, layout, weight_oi
from tunelab.modules import in_out_features

INIT_PATTERN = re.compile(r"default|gaussian|pissa|pissa_niter_[1-9][0-9]*|olora")
INIT_CHOICES = "default, gaussian, pissa, pissa_niter_<K> or olora"


def from_base(init: str) -> bool:
    """Whether `init` is computed from the base weight (PiSSA, OLoRA)."""
    return init == "olora" or init.startswith("pissa")


def check_targets(model: nn.Module, targets: list[str], init: str, r: int) -> None:
    """Refuse what a base-derived init cannot do, before anything is attached.

    The residual replaces the base weight, so the module must carry no other LoRA adapter, and r cannot exceed
    the weight's smaller dimension (the number of singular values / the rank of R).
    """
    if not from_base(init):
        return
    for path in targets:
        module = model.get_submodule(path)
        held = sorted(getattr(module, "lora_A", {}))
        if held:
            raise ConfigError(f"module {path}: init={init} rewrites its base weight, which adapters {held} "
                              f"already use; inject it on modules of its own")
        if r > min(in_out_features(module)):
            raise ConfigError(f"module {path}: init={init} needs r <= {min(in_out_features(module))} "
                              f"(the weight's smaller dimension), found r={r}")


@torch.no_grad()
def init_from_base(module: nn.Module, name: str, init: str) -> None:
    """Write A, B from the base weight, make the weight the residual W - s·B·A, and keep A0 = A, B0 = B."""
    scaling, r = module.lora_scaling[name], module.lora_A[name].out_features
    w = weight_oi(module)  # (out, in) fp32
    a, b = _olora(w, r) if init == "olora" else _pissa(w, r, scaling, init)
    module.lora_A[name].weight.copy_(a)
    module.lora_B[name].weight.copy_(b)
    module.weight.copy_(layout(module, w - scaling * b @ a))
    if not hasattr(module, "lora_initial"):
        module.add_module("lora_initial", nn.ModuleDict())
    module.lora_initial[name] = InitialFactors(a.clone(), b.clone())


def _pissa(w: torch.Tensor, r: int, scaling: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) with s·B·A the rank-r principal part of w (out, in)."""
    if init == "pissa":
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
        u, sv, vh = u[:, :r], sv[:r], vh[:r]
    else:
        u, sv, v = torch.svd_lowrank(w, r, niter=int(init.rsplit("_", 1)[1]))  # (out, r), (r,), (in, r)
        vh = v.t()
    sv = sv / scaling  # s·B·A = U_r S_r V_r^T
    return torch.diag(torch.sqrt(sv)) @ vh, u @ torch.diag(torch.sqrt(sv))


def _olora(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (R[:r] (r, in), Q[:, :r] (out, r)) of the QR decomposition of w (out, in)."""
    q, rr = torch.linalg.qr(w)
    return rr[:r].contiguous(), q[:, :r].contiguous()


def _initial(module: nn.Module, name: str) -> InitialFactors | None:
    initial = getattr(module, "lora_initial", None)
    return initial[name] if initial is not None and name in initial else None


def to_plain_lora(adapted: list[tuple[str, nn.Module]], name: str,
                  sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` with the A, B of every PiSSA/OLoRA layer replaced by A' = [A; A0] (2r, in), B' = [B, -B0] (out, 2r)."""
    out = dict(sd)
    for path, module in adapted:
        f = _initial(module, name)
        if f is not None:
            ka, kb = peft_key(path, "lora_A.weight"), peft_key(path, "lora_B.weight")
            out[ka] = torch.cat([sd[ka], f.lora_A.to(sd[ka].dtype)], dim=0)
            out[kb] = torch.cat([sd[kb], -f.lora_B.to(sd[kb].dtype)], dim=1)
    return out


def converted_config(config: dict, init: str, rslora: bool) -> dict:
    """adapter_config.json fields of the rank-2r plain LoRA that `to_plain_lora` writes (unchanged otherwise)."""
    if not from_base(init):
        return config
    alpha = config["lora_alpha"] * (2 ** 0.5 if rslora else 2)  # the same alpha/r (alpha/sqrt r) at rank 2r
    return {**config, "r": 2 * config["r"], "lora_alpha": alpha, "init_lora_weights": True}


def from_plain_lora(adapted: list[tuple[str, nn.Module]], name: str, sd: dict[str, torch.Tensor]):
    """Split rank-2r tensors of PiSSA/OLoRA layers back into A, B and the initial A0, B0 they carry.

    Returns `(sd', initial)`: `sd'` holds rank-r A, B for those layers; `initial` lists `(module, A0, B0)` for
    `adopt_initial` once every check has passed. Rank-r tensors (PEFT's unconverted form) pass through: the
    residual computed at inject from this base is the one they were trained on.
    """
    out, initial = dict(sd), []
    for path, module in adapted:
        ka, kb = peft_key(path, "lora_A.weight"), peft_key(path, "lora_B.weight")
        if _initial(module, name) is None or ka not in sd or kb not in sd:
            continue
        r = module.lora_A[name].out_features
        if sd[ka].shape[0] == 2 * r and sd[kb].shape[-1] == 2 * r:
            out[ka], out[kb] = sd[ka][:r], sd[kb][:, :r]
            initial.append((module, sd[ka][r:], -sd[kb][:, r:]))
    return out, initial


@torch.no_grad()
def adopt_initial(name: str, initial: list[tuple[nn.Module, torch.Tensor, torch.Tensor]]) -> None:
    """Take the initial factors a loaded adapter was trained from; the residual follows them.

    With the same base and init they equal the ones computed at inject (then nothing changes, bit for bit).
    """
    for module, a0, b0 in initial:
        f = _initial(module, name)
        a0, b0 = a0.to(f.lora_A), b0.to(f.lora_B)
        if torch.equal(f.lora_A, a0) and torch.equal(f.lora_B, b0):
            continue
        add_to_weight(module, module.lora_scaling[name] * (f.lora_B @ f.lora_A - b0 @ a0))
        f.lora_A.copy_(a0)
        f.lora_B.copy_(b0)


@torch.no_grad()
def restore_base(module: nn.Module, name: str) -> None:
    """Before removing an unmerged PiSSA/OLoRA adapter: weight += s·B0·A0 (the original base, up to rounding)."""
    f = _initial(module, name)
    if f is not None and name not in module.lora_merged:
        add_to_weight(module, module.lora_scaling[name] * f.lora_B @ f.lora_A)
