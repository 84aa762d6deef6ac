"""The shared helpers of the method tests (the one module they import besides conftest; no test file imports
another).

- batches, logits, snapshots, seeded noise and a few AdamW steps, used by every test file here;
- `inject_or_skip` / `prepared`: the contract matrix's set-up (test_matrix.py);
- matrix checks for methods run with per-method options (ia3, bitfit, adapter, prompt, prefix: BitFit's
  include_norms on Llama, each adapter variant): untrained == base, disabled == base, save/load, merge/unmerge,
  two named adapters and their removal, the analytic count, and mixed-adapter batches. Each takes a registered
  method, its options and a tiny model kind (tests/conftest.py) and drives it through the `Method` interface only;
- the input-side checks (`prompt`, `prefix`): padded rows and generation with the KV cache;
- `run_cli`: `tunelab train` for 3 steps through the CLI.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
import torch
from conftest import build_tiny, sample_batch
from torch import nn

from tunelab.cli import main
from tunelab.errors import ArtifactError, ConfigError
from tunelab.methods import get_method
from tunelab.methods.base import (
    Method, adapter_state, disabled, mark_trainable, set_active,
)

KINDS = ("llama", "gpt2", "bert")
LABELS = ["sports", "tech", "politics"]


# --- helpers ------------------------------------------------------------------------------------------------

def labelled_batch(tokenizer, kind: str) -> dict[str, torch.Tensor]:
    """Two padded rows with labels: next-token ids (pad -> -100) for causal LMs, class ids for BERT."""
    batch = dict(sample_batch(tokenizer))
    if kind == "bert":
        batch["labels"] = torch.tensor([0, 2])
    else:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def frozen_copy(t: torch.Tensor):
    """A copy to compare bit for bit: the tensor, or for a wrapper tensor subclass (qlora's NF4 weights) the
    inner tensors it stores (copying the wrapper itself would re-quantise)."""
    t = t.detach()
    if hasattr(type(t), "__tensor_flatten__"):
        return tuple(getattr(t, n).clone() for n in t.__tensor_flatten__()[0])
    return t.clone()


def same_bits(t: torch.Tensor, saved) -> bool:
    """Whether `t` still holds exactly what `frozen_copy` saved."""
    now = frozen_copy(t)
    if isinstance(saved, tuple):
        return isinstance(now, tuple) and all(torch.equal(a, b) for a, b in zip(now, saved, strict=True))
    return not isinstance(now, tuple) and torch.equal(now, saved)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: frozen_copy(p) for n, p in model.named_parameters()}


def adam_steps(model: nn.Module, method, name: str, batch: dict, steps: int = 3, lr: float = 1e-2) -> list[float]:
    """`steps` AdamW steps on adapter `name` alone; returns the loss before each step and after the last."""
    set_active(model, [name])
    mark_trainable(model, method.parameters(model, name))
    opt = torch.optim.AdamW(method.param_groups(model, name, lr=lr, weight_decay=0.0))
    losses = []
    for step in range(steps + 1):
        loss = model(**batch).loss
        losses.append(loss.item())
        if step < steps:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return losses


def perturb(method, model: nn.Module, name: str, seed: int, scale: float = 0.2) -> None:
    """Add seeded noise to every weight of adapter `name` (non-trivial values for parity checks)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.parameters(model, name).values():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def inject_or_skip(method, model: nn.Module, kind: str, name: str = "default") -> list[str]:
    """Inject with default options; a method that refuses the architecture must say so in one clear line."""
    try:
        return method.inject(model, method.Options(), name)
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg, f"{method.name} on {kind}: the refusal must be one line: {msg!r}"
        pytest.skip(f"{method.name} declares {kind} unsupported: {msg}")


def prepared(method_name: str, kind: str, tokenizer):
    """(model, method, base snapshot, base logits, batch) with adapter "default" injected, active and given
    seeded noise: a clearly visible adapter at no training cost."""
    model = build_tiny(kind, tokenizer)
    batch = labelled_batch(tokenizer, kind)
    snap, base = snapshot(model), logits(model, batch)
    method = get_method(method_name)
    inject_or_skip(method, model, kind)
    set_active(model, ["default"])
    perturb(method, model, "default", seed=0)
    return model, method, snap, base, batch



# --- the per-method matrix checks --------------------------------------------------------------------

def outputs(model: nn.Module, batch: dict) -> torch.Tensor:
    """The logits and the last hidden state, flattened into one vector.

    The hidden state is there because the tiny BERT's classifier (weights of std 0.02) barely moves its three
    logits; every change an adapter makes shows in the hidden state.
    """
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return torch.cat([out.logits.flatten(), out.hidden_states[-1].flatten()])


def hook_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(forward hooks, forward pre-hooks) per module path."""
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


@dataclass
class Case:
    """A tiny model with adapter(s) injected, and what the base gave before."""

    model: nn.Module
    method: Method
    snap: dict[str, torch.Tensor]  # the base parameters
    base: torch.Tensor  # the base outputs on `batch`
    batch: dict[str, torch.Tensor]

    def out(self) -> torch.Tensor:
        return outputs(self.model, self.batch)


def fresh(kind: str, tokenizer, method_name: str, options, names=("default",), seed: int | None = None) -> Case:
    """Inject adapters `names`; with `seed`, give each non-trivial weights; the first is the active one."""
    model = build_tiny(kind, tokenizer)
    batch = labelled_batch(tokenizer, kind)
    case = Case(model, get_method(method_name), snapshot(model), outputs(model, batch), batch)
    for i, name in enumerate(names):
        case.method.inject(model, options, name)
        if seed is not None:
            perturb(case.method, model, name, seed=seed + i)
    set_active(model, [names[0]])
    return case


# --- the checks -----------------------------------------------------------------------------------------

def check_train_keeps_base(kind, tokenizer, method_name, options) -> None:
    """3 AdamW steps: every step lowers the loss, the adapter changes, the base stays bit-identical."""
    c = fresh(kind, tokenizer, method_name, options)
    before = {n: p.detach().clone() for n, p in c.method.parameters(c.model, "default").items()}
    losses = adam_steps(c.model, c.method, "default", c.batch)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    params = dict(c.model.named_parameters())
    for n, base in c.snap.items():
        assert torch.equal(params[n], base), f"frozen base parameter {n} changed"
    after = c.method.parameters(c.model, "default")
    assert any(not torch.equal(after[n], before[n]) for n in before)


def check_untrained_and_disabled(kind, tokenizer, method_name, options) -> None:
    """A fresh adapter gives the base outputs exactly; a trained one differs; disabled gives the base again."""
    c = fresh(kind, tokenizer, method_name, options)
    assert torch.equal(c.out(), c.base)
    adam_steps(c.model, c.method, "default", c.batch)
    assert not torch.equal(c.out(), c.base)
    with disabled(c.model):
        assert torch.equal(c.out(), c.base)
    set_active(c.model, [])
    assert torch.equal(c.out(), c.base)


def check_save_load(kind, tokenizer, method_name, options) -> None:
    """state_dict (PEFT key layout) -> a fresh base -> inject + load_state_dict -> the same outputs."""
    c = fresh(kind, tokenizer, method_name, options, seed=1)
    want, sd = c.out(), c.method.state_dict(c.model, "default")
    assert sd and all(k.startswith("base_model.model.") and ".default" not in k for k in sd)
    torch.manual_seed(123)  # a different adapter initialisation before loading
    other = build_tiny(kind, tokenizer)
    config = c.method.adapter_config(c.model, options, "default")
    c.method.inject(other, c.method.options_from_config(config), "default")
    c.method.load_state_dict(other, sd, "default")
    assert torch.allclose(outputs(other, c.batch), want, atol=1e-6)


def check_merge(kind, tokenizer, method_name, options) -> None:
    """merge -> same outputs with the adapter folded in (and inactive); unmerge -> the base weights again."""
    c = fresh(kind, tokenizer, method_name, options, seed=2)
    want = c.out()
    c.method.merge(c.model, "default")
    assert adapter_state(c.model).active == ()
    assert torch.allclose(c.out(), want, atol=1e-5)
    set_active(c.model, ["default"])  # a merged adapter never applies twice
    assert torch.allclose(c.out(), want, atol=1e-5)
    c.method.unmerge(c.model, "default")
    params = dict(c.model.named_parameters())
    for n, before in c.snap.items():
        assert torch.allclose(params[n], before, atol=1e-6), n
    assert adapter_state(c.model).active == ("default",)
    assert torch.allclose(c.out(), want, atol=1e-5)
    with disabled(c.model):
        assert torch.allclose(c.out(), c.base, atol=1e-5)


def check_two_adapters(kind, tokenizer, method_name, options) -> None:
    """Two named adapters coexist, each giving its own outputs; removing both restores the base module tree."""
    c = fresh(kind, tokenizer, method_name, options, names=("a", "b"), seed=3)
    assert not set(c.method.parameters(c.model, "a")) & set(c.method.parameters(c.model, "b"))
    out_a = c.out()
    set_active(c.model, ["b"])
    assert not torch.allclose(out_a, c.out(), atol=1e-4)
    assert not torch.allclose(out_a, c.base, atol=1e-4)
    c.method.remove(c.model, "b")
    set_active(c.model, ["a"])
    assert torch.equal(c.out(), out_a)
    c.method.remove(c.model, "a")
    assert set(dict(c.model.named_parameters())) == set(c.snap)
    reference = build_tiny(kind, tokenizer)
    outputs(reference, c.batch)  # transformers may add its own hooks on a first forward
    assert hook_counts(c.model) == hook_counts(reference)
    assert adapter_state(c.model).methods == {}
    assert torch.equal(c.out(), c.base)


def check_count(kind, tokenizer, method_name, options) -> None:
    """The analytic `expected_trainable` (on a bare base) equals the trainable parameters after inject."""
    c = fresh(kind, tokenizer, method_name, options)
    expected = c.method.expected_trainable(build_tiny(kind, tokenizer), options)
    assert sum(p.numel() for p in c.model.parameters() if p.requires_grad) == expected > 0
    assert sum(p.numel() for p in c.method.parameters(c.model, "default").values()) == expected


def check_row_adapters(kind, tokenizer, method_name, options) -> None:
    """A mixed batch (row 0 adapter 'a', row 1 the base) gives each row what it gets in a batch of its own."""
    c = fresh(kind, tokenizer, method_name, options, names=("a",), seed=5)
    out_a = c.out()
    assert not torch.allclose(out_a, c.base, atol=1e-4)
    adapter_state(c.model).row_adapters = ["a", None]
    mixed = c.out()
    rows = _row_zero(c.model, c.batch)
    assert torch.allclose(mixed[rows], out_a[rows], atol=1e-5)
    assert torch.allclose(mixed[~rows], c.base[~rows], atol=1e-5)


def _row_zero(model: nn.Module, batch: dict) -> torch.Tensor:
    """A mask over `outputs`' flat vector: True on the entries of batch row 0."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    parts = [torch.zeros_like(t, dtype=torch.bool).index_fill_(0, torch.tensor([0]), True).flatten()
             for t in (out.logits, out.hidden_states[-1])]
    return torch.cat(parts)


def check_bf16_base(kind, tokenizer, method_name, options) -> None:
    """On a bf16 base the adapter's weights are fp32, outputs stay bf16, and gradients reach the adapter."""
    model = build_tiny(kind, tokenizer).to(torch.bfloat16)
    batch = labelled_batch(tokenizer, kind)
    base = outputs(model, batch)
    method = get_method(method_name)
    method.inject(model, options, "default")
    perturb(method, model, "default", seed=6)
    params = method.parameters(model, "default")
    assert params and all(p.dtype == torch.float32 for p in params.values())
    out = model(**batch)
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all()
               for p in params.values())
    assert not torch.equal(outputs(model, batch), base)


def check_load_errors(method: Method, model: nn.Module, key: str, wrong_shape: tuple[int, ...]) -> None:
    """Loading adapter 'default' (injected) without `key`, with `key` of `wrong_shape`, or with a key the model
    lacks raises `ArtifactError` naming the key (and both shapes); the adapter's weights stay as they were."""
    sd = method.state_dict(model, "default")
    needed = tuple(sd[key].shape)
    with pytest.raises(ArtifactError, match=f"missing keys {re.escape(key)}"):
        method.load_state_dict(model, {k: v for k, v in sd.items() if k != key}, "default")
    shape_msg = f"{key} has shape {wrong_shape}, the base model needs {needed}"
    with pytest.raises(ArtifactError, match=re.escape(shape_msg)):
        method.load_state_dict(model, {**{k: v + 1 for k, v in sd.items()}, key: torch.zeros(wrong_shape)}, "default")
    with pytest.raises(ArtifactError, match="unexpected keys base_model.model.nowhere.weight"):
        method.load_state_dict(model, {**sd, "base_model.model.nowhere.weight": torch.zeros(1)}, "default")
    assert all(torch.equal(v, sd[k]) for k, v in method.state_dict(model, "default").items())


ALL_CHECKS = (check_train_keeps_base, check_untrained_and_disabled, check_save_load, check_two_adapters,
              check_count, check_row_adapters)


# --- input-side checks --------------------------------------------------------------------------------

TEXTS = ("the quick brown fox", "hello, how are you today? i am fine")


def left_padded(tokenizer, texts=TEXTS) -> dict:
    """The texts as one left-padded batch (as `generate` wants for decoder models)."""
    tokenizer.padding_side = "left"
    try:
        return sample_batch(tokenizer, texts)
    finally:
        tokenizer.padding_side = "right"


def row_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over the real tokens (what `generate` passes): (B, L)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def check_padded_rows(model, tokenizer, side: str) -> None:
    """Each row of a padded batch gets, on its real tokens, the logits it gets alone (the mask covers the
    virtual tokens, positions count from them)."""
    batch = left_padded(tokenizer) if side == "left" else sample_batch(tokenizer, TEXTS)
    mask = batch["attention_mask"]
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=row_positions(mask)).logits
        for row, text in enumerate(TEXTS):
            alone = model(**sample_batch(tokenizer, (text,))).logits[0]
            assert torch.allclose(padded[row][mask[row].bool()], alone, atol=1e-5)


def check_generate_cache(model, tokenizer, max_new_tokens: int = 8) -> None:
    """Greedy decoding with the KV cache gives the tokens of decoding without it, and its first token is the
    forward pass's argmax (the virtual tokens enter once, at prefill)."""
    batch = left_padded(tokenizer)
    args = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    cached = model.generate(**batch, use_cache=True, **args)
    assert torch.equal(cached, model.generate(**batch, use_cache=False, **args))
    with torch.no_grad():
        last = model(**batch, position_ids=row_positions(batch["attention_mask"])).logits[:, -1]
    assert torch.equal(cached[:, batch["input_ids"].shape[1]], last.argmax(-1))


def run_cli(tiny_dirs, data, out, method: str, *sets: str, kind: str = "llama") -> dict:
    """`tunelab train` for 3 steps through `tunelab.cli.main`; returns run.json (the exit code must be 0)."""
    argv = ["train", "--model", str(tiny_dirs[kind]), "--data", str(data), "--method", method,
            "--max-steps", "3", "--batch-size", "2", "--lr", "1e-2", "--output", str(out), "--quiet"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    summary = json.loads((out / "run.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3 and summary["method"] == method
    assert (out / "artifact" / "adapter_config.json").is_file()
    return summary
