"""Training-step speed and peak memory: tunelab's methods against HF PEFT on the same model, in the same run.

Each (implementation, method) pair runs in a fresh subprocess on the same randomly initialised model built from a
config (no downloads), with the same random token batches, optimizer (AdamW) and precision (bf16 autocast with a
bf16 base on GPU, fp32 on CPU). Reported: tokens/s over the timed steps (warm-up steps excluded), peak memory
(CUDA allocator peak, or peak RSS on CPU), and the tunelab/PEFT ratios.

    python bench/train_vs_peft.py --shape llama-1b --batch-size 4 --seq-len 1024 --steps 12 \
        --out bench/results/train_vs_peft_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    # Llama-3.2-1B shapes
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True),
    # SmolLM2-135M shapes
    "llama-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True),
}
METHODS = {  # tunelab method + options, and the equivalent PEFT config
    "lora": ({"r": 16, "alpha": 32, "target_modules": "all-linear"},
             dict(kind="LoraConfig", r=16, lora_alpha=32, target_modules="all-linear")),
    "dora": ({"r": 16, "alpha": 32, "target_modules": "all-linear"},
             dict(kind="LoraConfig", r=16, lora_alpha=32, target_modules="all-linear", use_dora=True)),
    "ia3": ({}, dict(kind="IA3Config")),
}


def build_model(shape: str, device, dtype):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def attach(impl: str, method: str, model):
    """Attach the adapter with tunelab or PEFT; return (model to call, trainable params)."""
    import peft

    options, peft_cfg = METHODS[method]
    if impl == "tunelab":
        from tunelab.methods import get_method
        from tunelab.methods.base import mark_trainable

        m = get_method(method)
        m.inject(model, m.Options(**options), "default")
        params = m.parameters(model, "default")
        mark_trainable(model, params)
        return model, list(params.values())
    kwargs = {k: v for k, v in peft_cfg.items() if k != "kind"}
    cfg = getattr(peft, peft_cfg["kind"])(task_type="CAUSAL_LM", **kwargs)
    pm = peft.get_peft_model(model, cfg)
    return pm, [p for p in pm.parameters() if p.requires_grad]


def worker(args) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(args.shape, device, dtype)
    model, params = attach(args.impl, args.method, model)
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    vocab = SHAPES[args.shape]["vocab_size"]
    batches = [torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen) for _ in range(args.steps)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for ids in batches:
        ids = ids.to(device)
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(out.loss.item())
    timed = times[args.warmup:]
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"impl": args.impl, "method": args.method, "tokens_per_second": args.batch_size * args.seq_len * len(timed) / sum(timed),
            "peak_memory_bytes": peak, "peak_memory_source": "cuda_max_memory_allocated" if device == "cuda" else "os_peak_rss",
            "trainable_params": sum(p.numel() for p in params), "first_loss": losses[0], "last_loss": losses[-1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-135m", choices=sorted(SHAPES))
    p.add_argument("--methods", default="lora,dora,ia3")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        print(json.dumps(worker(args)))
        return
    rows = []
    for method in args.methods.split(","):
        for impl in ("peft", "tunelab"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--impl", impl, "--method", method]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"impl": impl, "method": method, "error": done.stderr.strip().splitlines()[-1:]})
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    result = {"command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]), "hardware": hardware(),
              "config": vars(args), "rows": rows, "ratios": ratios(rows)}
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


def ratios(rows: list[dict]) -> dict:
    """tunelab / PEFT for tokens/s and peak memory, per method."""
    by = {(r["impl"], r["method"]): r for r in rows if "error" not in r}
    out = {}
    for method in {r["method"] for r in rows}:
        t, ref = by.get(("tunelab", method)), by.get(("peft", method))
        if t and ref:
            out[method] = {"tokens_per_second_ratio": t["tokens_per_second"] / ref["tokens_per_second"],
                           "peak_memory_ratio": t["peak_memory_bytes"] / ref["peak_memory_bytes"]}
    return out


def hardware() -> dict:
    import peft
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


if __name__ == "__main__":
    main()
