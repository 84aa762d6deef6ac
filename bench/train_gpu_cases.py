"""The cases of bench/train_gpu.py and the worker that runs one of them (`python train_gpu_cases.py CASE WORK OUT`).

Shared assets are made once under WORK by the first case that needs them: the model (config + seed 0, bf16,
saved as safetensors), a word-level tokenizer whose words are the vocabulary's ids, and a `text` JSONL of random
token ids. The worker writes `{"step_times", "losses", "peak_memory_bytes", ...}` as JSON to OUT.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),  # CPU smoke test
}
LORA = {"r": 16, "alpha": 32, "target_modules": "all-linear"}
PEFT = {"lora": dict(kind="LoraConfig", r=16, lora_alpha=32, target_modules="all-linear"),
        "dora": dict(kind="LoraConfig", r=16, lora_alpha=32, target_modules="all-linear", use_dora=True),
        "ia3": dict(kind="IA3Config")}
LR = {"lora": 2e-4, "dora": 2e-4, "ia3": 3e-3, "full": 1e-5}


def _case(name, impl, shape, method, batch, seq, **extra):
    if impl == "tunelab" and method == "full":  # bf16 weights and AdamW moments, as the references train them
        extra["set"] = {"master_weights": False, **extra.get("set", {})}
    return {"name": name, "impl": impl, "shape": shape, "method": method, "batch": batch, "seq": seq,
            "full": method == "full", **extra}


def _peft_group(shape, method, batch, seq, **extra):
    tag = f"{shape}-{method}-{batch}x{seq}"
    return [_case(f"{tag}-peft", "peft", shape, method, batch, seq, **extra),
            _case(f"{tag}-peft-liger", "peft-liger", shape, method, batch, seq, **extra),
            _case(f"{tag}-tunelab", "tunelab", shape, method, batch, seq, **extra)]


def _full_group(shape, batch, seq):
    tag = f"{shape}-full-{batch}x{seq}"
    return [_case(f"{tag}-hf", "hf-full", shape, "full", batch, seq),
            _case(f"{tag}-hf-liger", "hf-liger-full", shape, "full", batch, seq),
            _case(f"{tag}-tunelab", "tunelab", shape, "full", batch, seq)]


SWITCHES_OFF = {"no-adapter-autocast": {"adapter_autocast": False}, "no-fused-loss": {"fused_loss": False},
                "no-liger": {"liger_kernels": False},
                "all-off": {"adapter_autocast": False, "fused_loss": False, "liger_kernels": False}}


def _ablations(shape, method, batch, seq, names):
    """tunelab with one switch off at a time (or all off: the plain path)."""
    tag = f"{shape}-{method}-{batch}x{seq}"
    return [_case(f"{tag}-tunelab-{n}", "tunelab", shape, method, batch, seq, set=SWITCHES_OFF[n]) for n in names]


GROUPS = {
    "1b-lora": _peft_group("1b", "lora", 8, 2048),
    "1b-lora-ablations": _ablations("1b", "lora", 8, 2048, SWITCHES_OFF),
    "1b-full": _full_group("1b", 8, 2048),
    "1b-full-ablations": _ablations("1b", "full", 8, 2048, ["no-fused-loss", "no-liger", "all-off"]),
    "1b-dora": _peft_group("1b", "dora", 8, 2048),
    "1b-ia3": _peft_group("1b", "ia3", 8, 2048),
    "8b-lora": _peft_group("8b", "lora", 4, 2048),
    # real data is uneven: padded batches (the references' way) against document-packed ones (no padding)
    "1b-lora-uneven": [_case("1b-lora-uneven-8x2048-peft-liger-padded", "peft-liger", "1b", "lora", 8, 2048,
                             uneven=True, packing=False),
                       _case("1b-lora-uneven-8x2048-tunelab-padded", "tunelab", "1b", "lora", 8, 2048, uneven=True,
                             packing=False),
                       _case("1b-lora-uneven-8x2048-tunelab-packed", "tunelab", "1b", "lora", 8, 2048, uneven=True,
                             packing_mask="document")],
    "8b-lora-ckpt": [_case("8b-lora-4x2048-tunelab-ckpt", "tunelab", "8b", "lora", 4, 2048, checkpointing=True,
                           steps=8, warmup=3, timed=5)],
    # the longest context goal: one step at batch 1, checkpointed block inputs parked in host memory
    "8b-longest": [_case("8b-lora-1x262144-tunelab-offload", "tunelab", "8b", "lora", 1, 262144,
                         checkpointing=True, set={"offload_activations": True}, steps=1, warmup=0, timed=1,
                         timeout=540)],
    "1b-profile": [_case("1b-lora-8x2048-tunelab-profile", "tunelab", "1b", "lora", 8, 2048, steps=6, profile=True),
                   _case("1b-lora-8x2048-peft-liger-profile", "peft-liger", "1b", "lora", 8, 2048, steps=6,
                         profile=True)],
    "1b-profile-tunelab": [_case("1b-lora-8x2048-tunelab-profile", "tunelab", "1b", "lora", 8, 2048, steps=6,
                                 profile=True)],
    "tiny-lora-ablations": _ablations("tiny", "lora", 2, 64, SWITCHES_OFF),
    "tiny-lora": _peft_group("tiny", "lora", 2, 64),
    "tiny-full": _full_group("tiny", 2, 64),
    "tiny-uneven": [_case("tiny-lora-uneven-2x256-peft-padded", "peft", "tiny", "lora", 2, 256, uneven=True,
                          packing=False),
                    _case("tiny-lora-uneven-2x256-tunelab-packed", "tunelab", "tiny", "lora", 2, 256, uneven=True,
                          packing_mask="document")],
}


def versions() -> dict:
    import importlib.metadata as md
    import platform

    import torch

    out = {"python": platform.python_version(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
           else None, "cuda": torch.version.cuda}
    for name in ("torch", "transformers", "peft", "liger-kernel", "triton", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# --- shared assets ------------------------------------------------------------------------------------------

def assets(shape: str, work: Path, tokens: int, uneven: bool = False) -> tuple[Path, Path]:
    """(model dir, data file) for `shape` under `work`, made on first use; `uneven`: documents of 64-2,048
    tokens (log-uniform), as real data is, instead of 1,000-token lines."""
    model_dir, data = work / f"model-{shape}", work / f"data-{shape}{'-uneven' if uneven else ''}.jsonl"
    if not (model_dir / "config.json").exists():
        make_model(shape, model_dir)
    if not data.exists() or data.stat().st_size < tokens * 4:
        make_data(shape, data, tokens, uneven)
    return model_dir, data


def make_model(shape: str, path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    vocab = SHAPES[shape]["vocab_size"]
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=131072, pad_token_id=vocab - 1,
                         bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    make_tokenizer(vocab).save_pretrained(tmp)
    tmp.rename(path)


def make_tokenizer(vocab: int):
    """Words `t0 .. t{vocab-2}` are ids 0 .. vocab-2; `<eos>` (also pad) is the last id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab - 1)} | {"<eos>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<eos>")


def make_data(shape: str, path: Path, tokens: int, uneven: bool = False) -> None:
    import math
    import random

    rng, vocab, written = random.Random(1), SHAPES[shape]["vocab_size"], 0
    with path.open("w") as f:
        while written < tokens + 2000:
            n = int(math.exp(rng.uniform(math.log(64), math.log(2048)))) if uneven else 1000
            f.write(json.dumps({"text": " ".join(f"t{rng.randrange(vocab - 1)}" for _ in range(n))}) + "\n")
            written += n


# --- the worker ---------------------------------------------------------------------------------------------

def run_tunelab(case: dict, model_dir: Path, data: Path, work: Path) -> dict:
    import torch
    from tunelab.config import RunConfig
    from tunelab.train import train

    cuda = torch.cuda.is_available()
    method = case["method"]
    opts = LORA if method in ("lora", "dora") else {}
    cfg = RunConfig(model=str(model_dir), data=str(data), method=method, method_options=opts,
                    output=str(work / f"run-{case['name']}"), seed=0, max_steps=case["steps"],
                    batch_size=case["batch"], grad_accum=case.get("accum", 1), seq_len=case["seq"],
                    packing=case.get("packing", True), schedule="constant",
                    packing_mask=case.get("packing_mask", "none"),  # default: the references' single causal mask
                    lr=LR[method], val_fraction=0.0, log_every=1, dtype="bfloat16" if cuda else "float32",
                    device="cuda" if cuda else "cpu", force=True,
                    gradient_checkpointing=case.get("checkpointing", False),
                    **{"overwrite": True, **case.get("set", {})})  # a case may set its own
    summary = train(cfg, progress=False)
    records = [json.loads(line) for line in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    elapsed = [r["elapsed"] for r in records]
    from transformers.models.llama import modeling_llama

    return {"step_times": [b - a for a, b in zip([0.0, *elapsed], elapsed)], "losses": [r["loss"] for r in records],
            "step_tokens": [r["tokens"] for r in records],
            "peak_memory_bytes": summary.get("peak_memory_bytes"), "trainable_params": summary.get("trainable_params"),
            "peak_memory_per_rank": summary.get("peak_memory_per_rank"), "world_size": summary.get("world_size", 1),
            "strategy": summary.get("strategy"), "tokens_per_second": summary.get("tokens_per_second"),
            "liger_applied": modeling_llama.apply_rotary_pos_emb.__module__.startswith("liger")}


def reference_model(case: dict, model_dir: Path):
    """The HF model (with Liger-Kernel and/or PEFT as the case says) and its trainable parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    model.to("cuda" if cuda else "cpu")
    if "liger" in case["impl"]:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=True)
    if case["full"]:
        return model, list(model.parameters())
    import peft

    spec = dict(PEFT[case["method"]])
    config = getattr(peft, spec.pop("kind"))(task_type="CAUSAL_LM", **spec)
    model = peft.get_peft_model(model, config, autocast_adapter_dtype=case["impl"] == "peft")
    return model, [p for p in model.parameters() if p.requires_grad]


def run_reference(case: dict, model_dir: Path, data: Path) -> dict:
    """HF (+ PEFT, + Liger) stepped by hand on the batches tunelab's sampler gives, in the same order."""
    import torch
    from tunelab.data import collate, load_data
    from tunelab.train.batches import WindowSampler

    cuda = torch.cuda.is_available()
    model, params = reference_model(case, model_dir)
    model.train()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = load_data(str(data), tok, "causal-lm", case["seq"], packing=case.get("packing", True), val_fraction=0.0)
    sampler = WindowSampler(len(ds.train), 0, case["batch"], 1)
    opt = torch.optim.AdamW(params, lr=LR[case["method"]], weight_decay=0.0, **({"fused": True} if cuda else {}))
    dev = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses, tokens = [], [], []
    for _ in range(case["steps"]):
        t0 = time.perf_counter()
        (window,) = sampler.next_window()
        host = collate([ds.train[i] for i in window], tok.pad_token_id, "causal-lm")
        tokens.append(int(host["attention_mask"].sum()))  # non-pad input tokens, as tunelab's records count
        batch = {k: v.to(dev) for k, v in host.items()}
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss))  # syncs, as tunelab's loop does once a step
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    return {"step_times": times, "losses": losses, "step_tokens": tokens, "peak_memory_bytes": peak,
            "trainable_params": sum(p.numel() for p in params)}


def main() -> None:
    case, work, out = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    model_dir, data = assets(case["shape"], work, case["steps"] * case["batch"] * case["seq"] + 4096,
                             case.get("uneven", False))
    runner = (lambda: run_tunelab(case, model_dir, data, work)) if case["impl"] == "tunelab" else \
        (lambda: run_reference(case, model_dir, data))
    if case.get("profile"):
        result = profiled(runner, case, work)
    else:
        result = runner()
    out.write_text(json.dumps(result))


def profiled(runner, case: dict, work: Path) -> dict:
    """Run under torch.profiler, recording the steady steps only: model loading, the first step and a warm-up
    step are skipped (the schedule advances at every optimizer step, through a global step hook, so no training
    code changes). The tables by self CUDA time and by self host time go to WORK/profile-<name>.txt."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    active = max(1, case["steps"] - 3)  # steps 3 .. steps-1: loading and step 1, then a warm-up step, before
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 schedule=schedule(wait=1, warmup=1, active=active, repeat=1)) as prof:
        hook = register_optimizer_step_post_hook(lambda *_: prof.step())
        try:
            result = runner()
        finally:
            hook.remove()
    averages = prof.key_averages()
    head = f"steps 3 to {2 + active} of {case['steps']} ({active} optimizer steps)\n"
    table = head + averages.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=70) + \
        "\n\nby host time (dispatch and Python overhead):\n" + \
        averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)
    (work / f"profile-{case['name']}.txt").write_text(table)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, f"profile-{case['name']}.txt").write_text(table)
    return result

if __name__ == "__main__":
    main()
