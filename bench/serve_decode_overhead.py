"""Host overhead of one serving decode step with LoRA adapters: a CPU proxy for GPU decode (issue 10).

Decode of a ~1B model on a GPU is bound by host-side Python and kernel launches, not by arithmetic. This
benchmark keeps that regime on any machine: a Llama of tiny width (hidden 64, 16 layers by default, so compute
is negligible) carries `--adapters` LoRA adapters (r=16, alpha 32, every linear layer: 16 x 7 = 112 hooked
modules, random non-zero B) attached the way `tunelab serve` attaches them, and one decode step (one token per
row, `--rows` rows, a `--cache`-token KV cache cropped back after each step) runs through `Engine._forward`,
the server's own forward. Cases:
- base: every row on the base model (no adapter work at all);
- one_active: every row on one adapter through the active-adapter path (`stack_one_adapter` without "decode");
- one_stacked: every row on one adapter through the stacked path (`row_adapters`, the uniform branch);
- mixed: each row on its own adapter (rows cycle over the adapters), the stacked path's gather.
Cases are interleaved round by round (`--rounds` x `--steps` steps each, after a warm-up) so load from other
processes hits all of them alike. On a CPU the clock is the thread's CPU time (`time.thread_time`, torch held to
one thread), which load from other processes on a shared machine barely moves; on a GPU it is wall time, CUDA
synchronised (`--clock` overrides). Printed: the median ms per step, and the adapter overhead per hooked module,
(case - base) / modules, in microseconds. `--dtype bfloat16` is the serving dtype on a GPU.

    PYTHONPATH=src python bench/serve_decode_overhead.py                      # CPU proxy
    PYTHONPATH=src python bench/serve_decode_overhead.py --device cuda        # the same on a GPU
    PYTHONPATH=src python bench/serve_decode_overhead.py --out overhead.json  # also write the figures
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_gpu import Inputs, attach_tunelab, environment, sync  # noqa: E402  (bench/ sits beside this file)

CASES = ("base", "one_active", "one_stacked", "mixed")


def build(args) -> tuple:
    """The tiny-width Llama (seed 0) in `args.dtype` on `args.device` with the adapters; (model, names)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                         max_position_embeddings=4 * args.cache, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.eval().requires_grad_(False)
    names = [f"a{i}" for i in range(args.adapters)]
    attach_tunelab(model, names, args.rank)
    return model, names


def hooked_modules(model) -> int:
    return sum(1 for m in model.modules() if hasattr(m, "_lora_hook"))


def run(args) -> dict:
    """Median ms per decode step for each case, and the per-module adapter overhead in microseconds."""
    from tunelab.serve.engine import Engine

    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    if args.clock == "thread":
        torch.set_num_threads(1)  # all the work on this thread, so its CPU time is the step's
    model, names = build(args)
    engine = Engine(model, SimpleNamespace(pad_token_id=0, eos_token_id=None), lock=threading.RLock(),
                    mixed_batch=lambda n: True)
    inp = Inputs(model, args.rows, args.cache, args.device)
    rows = {"base": [None] * args.rows, "one_active": [names[0]] * args.rows,
            "one_stacked": [names[0]] * args.rows, "mixed": [names[i % len(names)] for i in range(args.rows)]}
    phases = {"one_active": {"prefill"}}  # every other case: one adapter takes the stacked path in decode too
    steps, times = {}, {c: [] for c in CASES}
    with torch.inference_mode():
        for case in CASES:
            first = inp.prefill(rows[case])
            engine._forward(first)
            steps[case] = inp.decode(first)
        for round_ in range(args.warmup + args.rounds):
            for case in CASES:
                engine.stack_one_adapter = phases.get(case, {"prefill", "decode"})
                for _ in range(args.steps):
                    batch = steps[case]()
                    sync(args.device)
                    start = clock()
                    engine._forward(batch)
                    sync(args.device)
                    if round_ >= args.warmup:
                        times[case].append((clock() - start) * 1e3)
    modules = hooked_modules(model)
    ms = {c: round(statistics.median(t), 4) for c, t in times.items()}
    per_module = {c: round((ms[c] - ms["base"]) * 1e3 / modules, 2) for c in CASES if c != "base"}
    return {"ms_per_step": ms, "overhead_us_per_module": per_module, "modules": modules,
            "ratio_to_base": {c: round(ms[c] / ms["base"], 3) for c in CASES if c != "base"}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on a GPU (the serving dtype); float32 on a CPU, whose bf16 matmul "
                             "kernels are slow enough to hide the host overhead this measures")
    parser.add_argument("--clock", choices=["thread", "wall"], help="default: thread on a CPU, wall on a GPU")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--cache", type=int, default=64, help="KV cache length (prompt tokens) before the step")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="decode steps per case and round")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run untimed first")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    gpu = not args.device.startswith("cpu")
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.clock = args.clock or ("wall" if gpu else "thread")
    result = run(args) | {"settings": vars(args) | {"out": str(args.out)}, "environment": environment(args.device)}
    ms, over = result["ms_per_step"], result["overhead_us_per_module"]
    print(f"{result['modules']} hooked modules, {args.rows} rows, {args.cache}-token cache, {args.device} "
          f"{args.dtype}, {args.clock} clock")
    for case in CASES:
        extra = "" if case == "base" else (f"  {result['ratio_to_base'][case]:.3f}x base, "
                                           f"{over[case]} us/module")
        print(f"{case:12s} {ms[case]:8.3f} ms/step{extra}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
