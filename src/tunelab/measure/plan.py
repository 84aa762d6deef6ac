"""`tunelab plan`: predict the peak training memory of every strategy before training.

For each strategy the estimate breaks down into weights, gradients, AdamW states, activations kept for backward,
the logits/loss buffers and a framework overhead, plus the artifact size. The peak is not the sum of all of them:
a step passes through phases that hold different things, and the total is the largest phase:
- the loss (its forward or the start of backward): weights + AdamW states + every kept activation + the loss
  buffers (no gradients yet: the loop zeroes them with `set_to_none`); with the fused loss (the default for
  causal-LM models with a plain linear head) those are one chunk's logits and the gradients it computes early;
- with gradient checkpointing, the recompute of one block: the stored block inputs + one block's activations;
  with `offload_activations` the stored inputs wait in pinned host memory, and the GPU holds at most two of them
  (the one a block is computing from and the one being copied);
- full fine-tuning with the plain loss, the LM head's backward: activations + the logits' gradient + the head's
  weight gradient;
- the optimizer step: weights + AdamW states + every gradient (+ the CPU AdamW loop's temporaries).
Formulas and their sources: `plan_formulas` (activations, loss, optimizer) and `plan_methods` (per strategy).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from pydantic import BaseModel
from rich.table import Table

from tunelab.errors import ConfigError, closest
from tunelab.measure.plan_formulas import (
    FP32,
    Runtime,
    block_bytes,
    final_bytes,
    first_block_unkept,
    fused_loss_applies,
    fused_loss_buffers,
    logits_bytes,
    loss_buffers,
    optimizer_step_temp,
    runtime,
)
from tunelab.measure.plan_fsdp import distributed_strategy, per_gpu
from tunelab.measure.plan_methods import TERMS, Strategy, build_strategy
from tunelab.measure.plan_model import ModelInfo, describe_model
from tunelab.methods import get_method
from tunelab.methods.base import MethodOptions
from tunelab.train.optim import MasterWeightAdamW
from tunelab.validation import parse_model

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 10**3, "m": 10**6,
         "g": 10**9, "t": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MAX_BATCH = 1 << 20


class StrategyEstimate(BaseModel):
    """One strategy's predicted peak memory (bytes) and artifact size."""

    method: str
    family: str
    params_trainable: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    logits_bytes: int
    overhead_bytes: int
    peak_tensor_bytes: int  # what torch.cuda.max_memory_allocated would report
    total_bytes: int  # peak_tensor_bytes + overhead_bytes
    peak_phase: str
    artifact_bytes: int
    supported: bool = True
    fits: bool | None = None
    max_batch_size: int | None = None
    distributed: str | None = None  # nproc > 1: "fsdp" or "ddp", the strategy the figures are per GPU of
    notes: list[str] = []


class PlanResult(BaseModel):
    """The plan of one model and setting: every strategy's estimate (JSON-serialisable)."""

    model: str
    model_type: str
    task: str
    params_total: int
    batch_size: int
    seq_len: int
    dtype: str
    device: str
    gradient_checkpointing: bool
    offload_activations: bool = False
    nproc: int = 1  # GPUs of the run (FSDP2 or DDP, per strategy); every figure is per GPU
    strategy: str = "auto"  # the run's --strategy under nproc > 1: auto, fsdp or ddp
    reshard_after_forward: str = "auto"  # the run's FSDP2 switch: auto, always or never
    gpu_memory_bytes: int | None
    options: dict[str, dict[str, Any]]  # each planned method's own options, as validated
    strategies: list[StrategyEstimate]
    notes: list[str] = []


def parse_memory(text: str | int) -> int:
    """Bytes of a memory size: `80GB` (SI: 80e9), `24GiB` (24 * 2**30), `16000MB`, `1.5T`, or plain bytes.

    Raises `ConfigError` naming the value when it cannot be read.
    """
    if isinstance(text, int) and text > 0:
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--gpu-memory {text!r}: expected a positive size like 80GB, 24GiB or 16000MB")
    return int(float(match.group(1)) * UNITS[unit])


def resolve_dtype(dtype: str, device: str) -> tuple[str, int]:
    """(dtype name, bytes per weight): `auto` is bf16 on CUDA and fp32 on CPU, as `tunelab.models.pick_dtype`."""
    if dtype == "auto":
        return ("bfloat16", 2) if device == "cuda" else ("float32", 4)
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype {dtype!r}: expected one of auto, {', '.join(DTYPE_BYTES)}")
    return dtype, DTYPE_BYTES[dtype]


def _activations(st: Strategy, info: ModelInfo, rt: Runtime, batch: int, seq: int) -> tuple[float, float, float]:
    """(all blocks, outside the blocks, one block) bytes kept for backward at batch size `batch`."""
    s = seq + st.extra_tokens  # tokens each block runs: a soft prompt adds its virtual tokens
    tokens = batch * s
    kv_seq, kv_width = s + st.prefix_tokens, info.kv_dim
    blocks = st.keeps.extra_per_token * tokens
    if st.prefix_tokens:  # prefixes come with an (s, n + s) mask in the run dtype, so SDPA gets repeated kv heads
        kv_width = info.heads * info.head_dim
        blocks += rt.param_bytes * batch * s * kv_seq
    blocks += info.layers * block_bytes(info, rt, st.keeps, s, kv_seq, kv_width) * tokens
    blocks -= first_block_unkept(info, rt, st.keeps, s, kv_seq, kv_width) * tokens
    return blocks, final_bytes(info, rt, st.keeps) * tokens + st.keeps.extra_fixed, blocks / info.layers


def _with_checkpointing(st: Strategy) -> Strategy:
    """Under checkpointing tunelab makes the embedding output require grad when the base is frozen
    (`train.activations.enable_gradient_checkpointing`), so the first norm keeps its input as with full fine-tuning."""
    return dataclasses.replace(st, keeps=dataclasses.replace(st.keeps, input_grad=True))


def _checkpointed_inputs(st: Strategy, info: ModelInfo, rt: Runtime, batch: int, seq: int) -> float:
    """With gradient checkpointing, each block keeps only its input hidden state (run dtype) on the GPU; with
    offloading, at most two of them are there at once."""
    blocks = min(info.layers, 2) if rt.offload_activations else info.layers
    return blocks * _block_input(st, info, rt, batch, seq)


def _block_input(st: Strategy, info: ModelInfo, rt: Runtime, batch: int, seq: int) -> float:
    return rt.param_bytes * info.hidden * batch * (seq + st.extra_tokens)


def phases(st: Strategy, info: ModelInfo, rt: Runtime, batch: int, seq: int, ckpt: bool) -> dict[str, float]:
    """Bytes beyond weights + AdamW states held in each phase of a training step (see the module docstring)."""
    st = _with_checkpointing(st) if ckpt else st
    p, h = rt.param_bytes, info.hidden
    s = seq + st.extra_tokens
    blocks, final, one_block = _activations(st, info, rt, batch, seq)
    fused = fused_loss_applies(info, rt)
    loss_fwd, loss_bwd = (fused_loss_buffers(info, rt, batch, seq, st.method == "full") if fused
                          else loss_buffers(info, rt, batch, seq, s))
    # prefix: the model output carries the key/value cache (every layer's n + s keys and values) until the loop
    # has computed the loss from it
    loss_fwd += p * 2 * info.kv_dim * (s + st.prefix_tokens) * batch * info.layers if st.prefix_tokens else 0
    grads = st.trainable_bytes
    out = {"optimizer step": grads + optimizer_step_temp(rt, st.largest_trainable_bytes)}
    if st.master == "optimizer":  # fp32 copies of one chunk's 16-bit gradients while it steps
        out["optimizer step"] += min(MasterWeightAdamW.CHUNK_BYTES, FP32 * st.base_trainable)
    stored = _checkpointed_inputs(st, info, rt, batch, seq)
    kept = (stored if ckpt else blocks) + final
    out["loss"] = kept + max(loss_fwd, loss_bwd, st.transient_bytes) + st.gathered_bytes
    if ckpt:
        out["recompute"] = (stored + final + one_block + 2 * p * h * batch * s + st.transient_bytes
                            + st.gathered_bytes)
    if st.whole_model and info.task == "causal-lm" and not fused:  # fused: the head's gradient is in loss_*
        out["lm-head backward"] = kept + p * batch * s * info.vocab + p * info.vocab * h + st.gathered_bytes
        if info.tied:  # the embedding's gradient is added to the head's out of place: new grad + sum beside it
            out["optimizer step"] = max(out["optimizer step"], grads + 2 * p * info.vocab * h)
    return out


def activation_total(st: Strategy, info: ModelInfo, rt: Runtime, batch: int, seq: int, ckpt: bool) -> float:
    """Activation bytes reported in the breakdown: all kept, or with checkpointing the stored inputs + one block."""
    if not ckpt:
        return sum(_activations(st, info, rt, batch, seq)[:2])
    _, final, one_block = _activations(_with_checkpointing(st), info, rt, batch, seq)
    return _checkpointed_inputs(st, info, rt, batch, seq) + one_block + final


def estimate(st: Strategy, info: ModelInfo, rt: Runtime, batch: int, seq: int, ckpt: bool) -> StrategyEstimate:
    """The breakdown and peak of strategy `st` at batch size `batch` and sequence length `seq`."""
    states = st.optimizer_bytes
    by_phase = phases(st, info, rt, batch, seq, ckpt)
    phase = max(by_phase, key=by_phase.get)
    peak = st.weights_bytes + states + by_phase[phase] + rt.workspace_bytes
    refusals = [st.unsupported] if st.unsupported else []
    if ckpt and st.no_checkpointing:
        refusals.append(st.no_checkpointing)
    host = [f"offload_activations: {info.layers * _block_input(st, info, rt, batch, seq) / 2**30:.2f} GiB of "
            "block inputs in pinned host memory"] if ckpt and rt.offload_activations else []
    return StrategyEstimate(
        method=st.method, family=st.family, params_trainable=st.params_trainable,
        weights_bytes=round(st.weights_bytes), gradients_bytes=round(st.trainable_bytes),
        optimizer_bytes=round(states), activations_bytes=round(activation_total(st, info, rt, batch, seq, ckpt)),
        logits_bytes=round(logits_bytes(info, rt, batch, seq, seq + st.extra_tokens, st.method == "full")),
        overhead_bytes=rt.overhead_bytes, peak_tensor_bytes=round(peak), total_bytes=round(peak) + rt.overhead_bytes,
        peak_phase=phase, artifact_bytes=round(st.artifact_bytes), supported=not refusals,
        notes=[*st.notes, *host, *refusals],
    )


def largest_batch(st: Strategy, info: ModelInfo, rt: Runtime, seq: int, ckpt: bool, budget: int) -> int | None:
    """The largest batch size whose total fits `budget` bytes (the total grows with the batch); None if 1 does not."""
    def fits(b: int) -> bool:
        return estimate(st, info, rt, b, seq, ckpt).total_bytes <= budget

    if not fits(1):
        return None
    lo, hi = 1, 2
    while hi <= MAX_BATCH and fits(hi):
        lo, hi = hi, hi * 2
    if hi > MAX_BATCH:
        return lo
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def method_options_for(chosen: list[str], common: dict[str, Any] | None = None,
                   per_method: dict[str, dict[str, Any]] | None = None) -> dict[str, MethodOptions]:
    """Each chosen method's own `Options`, validated as `train --set` validates them.

    `common` (`plan --set key=value`) applies to every chosen method whose options have the key (r to the LoRA
    family, num_virtual_tokens to prefix and prompt, ...); a key no chosen method has is an error.
    `per_method` (`--set-for METHOD.key=value`, as compare) applies to that method only and wins over `common`.
    """
    common, per_method = dict(common or {}), dict(per_method or {})
    for name in per_method:
        if name not in chosen:
            raise ConfigError(f"--set-for names method '{name}', which is not planned{closest(name, chosen)}; "
                              f"planned: {', '.join(chosen)}")
    fields = {name: get_method(name).Options.model_fields for name in chosen}
    known = sorted({key for f in fields.values() for key in f})
    for key in common:
        if not any(key in f for f in fields.values()):
            raise ConfigError(f"plan --set: unknown key '{key}'{closest(key, known)}; no planned method has it "
                              f"(keys: {', '.join(known) or 'none'})")
    return {name: parse_model(get_method(name).Options,
                              {**{k: v for k, v in common.items() if k in fields[name]}, **per_method.get(name, {})},
                              where=f"plan options for method '{name}'")
            for name in chosen}


def _methods(methods: list[str] | None) -> list[str]:
    """The methods to plan, each registered (else the closest name) and with planner terms."""
    chosen = list(methods) if methods else list(TERMS)
    for m in chosen:
        get_method(m)
        if m not in TERMS:
            raise ConfigError(f"method '{m}': the planner has no terms for it; it knows {', '.join(TERMS)}")
    return chosen


def _check_arguments(batch_size: int, seq_len: int, device: str, nproc: int, strategy: str,
                     reshard_after_forward: str, offload_activations: bool, gradient_checkpointing: bool) -> None:
    """`plan`'s scalar arguments, each refused with a one-line `ConfigError` naming it."""
    if batch_size <= 0 or seq_len <= 0:
        key, value = ("batch_size", batch_size) if batch_size <= 0 else ("seq_len", seq_len)
        raise ConfigError(f"{key} = {value}: expected a positive integer")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device {device!r}: expected 'cuda' or 'cpu'")
    if nproc < 1:
        raise ConfigError(f"nproc = {nproc}: expected a positive integer")
    if strategy not in ("auto", "fsdp", "ddp"):
        raise ConfigError(f"strategy {strategy!r}: expected auto, fsdp or ddp")
    if reshard_after_forward not in ("auto", "always", "never"):
        raise ConfigError(f"reshard_after_forward {reshard_after_forward!r}: expected auto, always or never")
    if offload_activations and not (gradient_checkpointing and device == "cuda"):
        raise ConfigError("offload_activations: expected gradient_checkpointing on a cuda device; it parks the "
                          "checkpointed block inputs in host memory")


def plan(model_spec: Any, *, batch_size: int = 8, seq_len: int = 256, dtype: str = "auto",
         gradient_checkpointing: bool = False, method_options: dict[str, Any] | None = None,
         gpu_memory: str | int | None = None, device: str = "cuda", methods: list[str] | None = None,
         task: str | None = None, options_for: dict[str, dict[str, Any]] | None = None,
         fused_loss: bool = True, nproc: int = 1, offload_activations: bool = False,
         master_weights: bool = True, strategy: str = "auto", reshard_after_forward: str = "auto") -> PlanResult:
    """Predict the peak training memory of each strategy for `model_spec`.

    Args:
        model_spec: a local HF model dir, a config.json path, a packaged alias, a config dict or a
            PretrainedConfig. Only the config is read: the model is built on the meta device.
        batch_size, seq_len: the micro-batch shape (tokens per sequence, padded length).
        dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16: the model's dtype.
        gradient_checkpointing: whether each block is recomputed in the backward pass.
        method_options: options for every planned method that has the key, named as each method's own
            `Options` (`train --set`): r, dropout, target_modules, num_virtual_tokens, variant,
            bottleneck_size, include_norms, ...; a key no planned method has is a `ConfigError`.
        options_for: {method: {key: value}} for one method only (`--set-for lora.dropout=0.1`); wins over
            `method_options`.
        gpu_memory: a size (`80GB`, `24GiB`, `16000MB` or bytes): each strategy then says whether it fits and
            the largest batch size that does.
        device: "cuda" (tunelab's GPU scheme: bf16 autocast, fused AdamW, CUDA overhead) or "cpu".
        methods: the strategies to plan (default: all of full, lora, dora, qlora, adapter, prefix, prompt, ia3,
            bitfit).
        task: causal-lm or classification; default from the config.
        fused_loss: the run's `fused_loss` switch (the loss without full logits; on by default).
        nproc: GPUs of a `train --nproc N` run: every figure is then per GPU, with `batch_size` the micro-batch
            of one GPU, under FSDP2 (`plan_fsdp`) or DDP (a whole copy plus its gradient buckets).
        strategy: the run's `--strategy` with `nproc` > 1. `auto` decides per method as `train` does
            (`train/distributed.py`): DDP when the replicated state fits half of `gpu_memory`, else FSDP2;
            without `gpu_memory`, FSDP2 from `FSDP_AUTO_PARAMS` parameters on; qlora always DDP.
        reshard_after_forward: the run's switch under FSDP2 (auto, always, never): whether each block frees
            its gathered weights after the forward; auto keeps them when the model in the run dtype takes at
            most 15% of `gpu_memory` (never without it), as `train` decides.
        offload_activations: the run's switch (CUDA, with gradient checkpointing): the checkpointed block inputs
            are planned in host memory (each strategy's notes give how much).
        master_weights: the run's `--master-weights` (on by default, as in train) on a 16-bit model: weights
            that train in the model dtype (full fine-tuning) get fp32 master copies and fp32 AdamW moments (in
            the optimizer's state; under FSDP2, `nproc` > 1, as fp32 shards with fp32 gradients).

    Returns:
        A `PlanResult` (pydantic; `.model_dump_json()` gives JSON).
    """
    _check_arguments(batch_size, seq_len, device, nproc, strategy, reshard_after_forward, offload_activations,
                     gradient_checkpointing)
    dtype_name, param_bytes = resolve_dtype(dtype, device)
    budget = parse_memory(gpu_memory) if gpu_memory is not None else None
    chosen = _methods(methods)
    opts = method_options_for(chosen, method_options, options_for)
    info = describe_model(model_spec, task)
    rt = runtime(device, param_bytes, fused_loss, offload_activations)
    estimates = []
    for method in chosen:
        whole = build_strategy(method, info, opts[method], rt)
        spread = distributed_strategy(strategy, whole, info, nproc, budget)
        st = per_gpu(whole, info, nproc, spread, master_weights, reshard_after_forward, budget)
        est = estimate(st, info, rt, batch_size, seq_len, gradient_checkpointing)
        est.params_trainable = whole.params_trainable  # the model's, not one GPU's share
        est.distributed = spread
        if budget is not None:
            est.fits = est.supported and est.total_bytes <= budget
            est.max_batch_size = (largest_batch(st, info, rt, seq_len, gradient_checkpointing, budget)
                                  if est.supported else None)
        estimates.append(est)
    return PlanResult(
        model=info.source, model_type=info.model_type, task=info.task, params_total=info.params_total,
        batch_size=batch_size, seq_len=seq_len, dtype=dtype_name, device=device,
        gradient_checkpointing=gradient_checkpointing, offload_activations=offload_activations, nproc=nproc,
        strategy=strategy, reshard_after_forward=reshard_after_forward,
        gpu_memory_bytes=budget,
        options={m: o.model_dump() for m, o in opts.items()}, strategies=estimates, notes=_plan_notes(info),
    )


def _spread_title(result: PlanResult) -> str:
    """', FSDP2 on 2 GPUs (per GPU)' (or DDP, or both where auto chose per method) for the table's title."""
    if result.nproc <= 1:
        return ""
    kinds = sorted({e.distributed for e in result.strategies if e.distributed}, reverse=True)
    names = " or ".join({"fsdp": "FSDP2", "ddp": "DDP"}[k] for k in kinds) or "FSDP2"
    return f", {names} on {result.nproc} GPUs (per GPU)"


def _plan_notes(info: ModelInfo) -> list[str]:
    notes = ["assumes unpadded (or packed) batches: padding adds an attention mask and, with grouped-query "
             "attention, repeated key/value heads"]
    if info.arch == "generic":
        notes.append(f"model_type {info.model_type!r}: parameters are exact; activations use the Llama block "
                     "formulas and are approximate")
    return notes


def render_plan(result: PlanResult):
    """A rich Table of `result`: one row per strategy, sizes in GiB (artifact in MiB), notes as its caption."""
    title = (f"{result.model} ({result.model_type}, {result.params_total / 1e6:,.1f}M params) - batch "
             f"{result.batch_size} x seq {result.seq_len}, {result.dtype} on {result.device}"
             f"{', gradient checkpointing' if result.gradient_checkpointing else ''}"
             f"{', activations offloaded' if result.offload_activations else ''}"
             f"{_spread_title(result)}")
    notes = [f"{e.method}: {note}" for e in result.strategies for note in e.notes] + list(result.notes)
    table = Table(title=title, caption="\n".join(notes) or None)
    columns = ["method", "trainable", "weights", "grads", "AdamW", "activations", "logits", "total GiB",
               "peak in", "artifact MiB"]
    if result.gpu_memory_bytes is not None:
        columns += [f"fits {result.gpu_memory_bytes / 2**30:.1f} GiB", "max batch"]
    for name in columns:
        table.add_column(name, justify="left" if name in ("method", "peak in") else "right")
    for e in result.strategies:
        row = [e.method, f"{e.params_trainable:,}", *(_gib(v) for v in (
            e.weights_bytes, e.gradients_bytes, e.optimizer_bytes, e.activations_bytes, e.logits_bytes,
            e.total_bytes)), e.peak_phase, f"{e.artifact_bytes / 2**20:,.2f}"]
        if result.gpu_memory_bytes is not None:
            fit = "n/a" if not e.supported else ("yes" if e.fits else "no")
            row += [fit, "-" if e.max_batch_size is None else str(e.max_batch_size)]
        table.add_row(*row)
    return table


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f}"


__all__ = ["PlanResult", "StrategyEstimate", "parse_memory", "plan", "render_plan"]
