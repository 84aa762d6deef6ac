"""QLoRA: LoRA on a 4-bit NF4 base with double quantisation (Dettmers et al. 2023, "QLoRA: Efficient
Finetuning of Quantized LLMs", arXiv:2305.14314).

`inject` attaches LoRA adapters (by default to every linear layer but the output head, as the paper does), then
stores the frozen weights of every linear layer but the output head as NF4 through torchao (`nf4.py`: blocks of
64 weights, or 32/16 where 64 does not divide the input dim, scalers quantised again to int8; a layer no block
size fits stays in its dtype). The parameter names and the module tree stay as they were: `weight` becomes a
frozen Parameter holding the NF4 tensor and the layer's forward dequantises block by block inside the matmul.
torchao's NF4 works on CPU and on GPU, so qlora does too. The adapters are fp32 and train against the
NF4-dequantised weights. `memory_report` gives the bytes the quantised weights took before and after, and the
layers left unquantised; the training loop writes it to run.json.

The artifact is a standard PEFT LoRA adapter (peft_type LORA), loadable by `PeftModel.from_pretrained` on the
*unquantised* base; it was trained against the NF4-dequantised weights, so there it gives outputs close to, not
equal to, the training model (the difference is the NF4 rounding of the base). tunelab's own loader picks qlora
from the artifact's sidecar and quantises the base the same way, which reproduces the training model.

Merge dequantises each target's weight and adds the LoRA delta (the layer is no longer quantised afterwards;
unmerge leaves it dequantised). Quantising changes the base under other adapters, so qlora refuses a model that
holds adapters of other methods, and the other LoRA-family methods refuse NF4 layers. Removing the last qlora
adapter dequantises the base again (the NF4-rounded values: the full-precision weights are not kept, that is
the memory saved).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import nn

from tunelab.errors import ConfigError
from tunelab.methods import nf4
from tunelab.methods.base import Method, adapter_state, find_targets, register
from tunelab.methods.lora import LoRAFamily, RandomInitOptions


class QLoRAOptions(RandomInitOptions):
    """`--set` options of `qlora`: those of `lora` (init default or gaussian), every linear layer adapted by
    default (as QLoRA)."""

    target_modules: list[str] | str | None = Field(
        "all-linear", description="module names, a regex (full match), or 'all-linear' (the default)")


def quantizable(model: nn.Module) -> list[str]:
    """Every linear layer but the output head (QLoRA quantises all of them), adapters' own layers left out."""
    return find_targets(model, "all-linear")


@register
class QLoRA(LoRAFamily, Method):
    """LoRA adapters trained on a frozen NF4 (4-bit, double-quantised) base."""

    name = "qlora"
    family = "reparameterisation"
    trains = "low-rank A, B beside NF4-quantised linears"
    paper = "Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs (arXiv:2305.14314)"
    Options = QLoRAOptions
    mergeable = True
    supports_mixed_batch = True
    peft_type = "LORA"
    peft_loadable = True
    on_nf4_base = True
    changes_base = True

    def attach(self, model: nn.Module, options: QLoRAOptions, name: str) -> list[str]:
        """Attach LoRA adapter `name`, then store the base linears as NF4; return the touched modules."""
        others = sorted(f"{n} ({m})" for n, m in adapter_state(model).methods.items() if m != self.name)
        if others:
            raise ConfigError(f"qlora quantises the base weights to NF4, which would change the adapters already "
                              f"loaded ({', '.join(others)}); load qlora adapters on a base of their own")
        touched = super().attach(model, options, name)
        for path in quantizable(model):
            nf4.quantize(model.get_submodule(path))
        return touched

    def remove(self, model: nn.Module, name: str) -> None:
        """Delete the adapter; with the last qlora adapter gone, the base is dequantised (NF4-rounded values)."""
        super().remove(model, name)
        if self.name not in adapter_state(model).methods.values():
            for module in model.modules():
                nf4.dequantize(module)

    def matches_config(self, config: dict[str, Any]) -> bool:
        """Never from a config alone: a LoRA config does not say its base was quantised (the sidecar does)."""
        return False

    def memory_report(self, model: nn.Module, name: str) -> dict[str, Any]:
        """Bytes of the quantised base weights before and after NF4, and the linear layers left unquantised."""
        records, unquantized = {}, {}
        for path in quantizable(model):
            module = model.get_submodule(path)
            if nf4.is_quantized(module):
                records[path] = getattr(module, nf4.NF4_ATTR)
            else:
                unquantized[path] = (nf4.unquantizable_reason(module) if nf4.block_sizes(module.weight) is None
                                     else "dequantised by merge")
        before = sum(r.bytes_before for r in records.values())
        after = sum(r.bytes_after for r in records.values())
        return {"base_quantization": "nf4, double-quantised scalers (torchao)",
                "quantized_modules": len(records), "quantized_weight_bytes_before": before,
                "quantized_weight_bytes_after": after, "base_bytes_saved": before - after,
                "unquantized_modules": unquantized}
