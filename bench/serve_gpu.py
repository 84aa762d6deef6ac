"""Serving speed with many adapters: tunelab's engine forward against HF PEFT's `adapter_names=`, in one run.

A Llama-shaped model (default: Llama-3.2-1B's shapes, random weights from a config, bf16 on GPU) carries
`--adapters` LoRA adapters (r=16, alpha 32, all linear layers, random non-zero B). Timed, median of `--reps`
after warm-up, CUDA-synchronised:
- prefill: one forward of `--rows` rows x `--prompt` tokens into an empty KV cache;
- decode step: one forward of one token per row on a `--prompt`-token cache (cropped back after each step).
Cases, each with every row on its own adapter ("mixed"), every row on one adapter ("one"), and the base:
- tunelab through `Engine._forward` (what the server runs): the stacked path (`methods/stacked.py`); one adapter
  both on the stacked path and on the plain active-adapter path; and the per-adapter loop it replaced
  ("before", the stacked path switched off), for the mixed batch;
- PEFT: `PeftModel` with the same adapters, `adapter_names=[...]` for mixed batches, `set_adapter` for one.

    python bench/serve_gpu.py --out bench/results/serve_gpu_h200.json            # on the GPU
    python bench/serve_gpu.py --shape tiny --rows 4 --prompt 16 --adapters 4 --reps 2 --device cpu  # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, tie_word_embeddings=True),
}


def build_model(shape: str, device: str, dtype: torch.dtype):
    """The base model with random weights (seed 0), eval mode, frozen."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=dtype)
    return model.eval().requires_grad_(False)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, setup, reps: int, warmup: int, device: str) -> float:
    """Median wall time of `fn()` in ms over `reps` runs after `warmup`; `setup()` runs untimed before each."""
    times = []
    for i in range(warmup + reps):
        arg = setup()
        sync(device)
        start = time.perf_counter()
        fn(arg)
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 3)


class Inputs:
    """The prompts (random token ids, seed 1) and the batches both implementations feed."""

    def __init__(self, model, rows: int, prompt: int, device: str):
        gen = torch.Generator().manual_seed(1)
        self.model, self.device = model, device
        self.ids = torch.randint(5, model.config.vocab_size, (rows, prompt), generator=gen)

    def prefill(self, names):
        from tunelab.serve.batch import prefill_batch

        rows = [SimpleNamespace(request=SimpleNamespace(adapter=n)) for n in names]
        return prefill_batch(rows, self.ids.tolist(), 0, self.device, self.model.config)

    def decode(self, prefilled, decoder=None):
        """A one-token step after `prefilled` (whose cache holds the prompts), the cache set back before each:
        on transformers' DynamicCache, or moved into `decoder`'s slot cache (what the engine's waves decode on)."""
        from tunelab.serve.batch import next_step

        rows = len(prefilled.rows)
        step = next_step(prefilled, [7] * rows, list(range(rows)))
        length = prefilled.mask.shape[1]
        if decoder is not None:
            step = decoder.adopt(step, length + 16)
            held = list(step.cache.host)

            def setup():  # every row back to its prompt's length
                step.cache.host = list(held)
                step.cache.lengths[:rows] = torch.tensor(held)
                return step
            return setup

        def setup():
            for layer in step.cache.layers:  # keys/values: (B, heads, S, head_dim); drop the last step's token
                layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]
            return step
        return setup


def tunelab_rows(model, names: list[str], inp: Inputs, args) -> dict:
    """tunelab's engine forward: mixed (stacked and the loop before it), one adapter (stacked, active), base.

    Decode steps run as the engine's waves do: on the slot cache, as CUDA graphs on a GPU (`serve/slots.py`);
    `*_eager` cases decode on the slot cache without graphs; "one_active", "mixed_dynamic" and "mixed_before" on
    transformers' DynamicCache (the active-adapter path, the stacked path, and the per-adapter loop the stacked
    path replaced)."""
    from tunelab.methods import stacked
    from tunelab.serve.engine import Engine

    tok = SimpleNamespace(pad_token_id=0, eos_token_id=None)
    engine = Engine(model, tok, lock=threading.RLock(), mixed_batch=lambda n: True, max_batch_size=args.rows)
    rows = args.rows
    mixed = [names[i % len(names)] for i in range(rows)]
    cases = {"mixed": mixed, "one": [names[0]] * rows, "base": [None] * rows, "mixed_eager": mixed,
             "one_eager": [names[0]] * rows, "base_eager": [None] * rows, "one_active": [names[0]] * rows,
             "mixed_dynamic": mixed, "mixed_before": mixed}
    graphs = engine.decoder is not None and engine.decoder.graphs
    usable = stacked.usable
    out = {}
    for case, row_names in cases.items():
        engine.stack_one_adapter = set() if case == "one_active" else {"prefill", "decode"}
        stacked.usable = (lambda m: False) if case == "mixed_before" else usable
        reps, warm = (max(2, args.reps // 3), 1) if case == "mixed_before" else (args.reps, args.warmup)
        try:
            with torch.inference_mode():
                prefill = timed(engine._forward, lambda names=row_names: inp.prefill(names), reps, warm, args.device)
                first = inp.prefill(row_names)
                logits = engine._forward(first).float()
                dynamic = case in ("one_active", "mixed_dynamic", "mixed_before")
                if engine.decoder is not None:
                    engine.decoder.graphs = graphs and not case.endswith("_eager")
                decode = timed(engine._forward, inp.decode(first, None if dynamic else engine.decoder), reps, warm,
                               args.device)
        finally:
            stacked.usable = usable
        out[case] = {"prefill_ms": prefill, "decode_ms": decode, "last_logits": logits}
        print(f"tunelab {case}: prefill {prefill} ms, decode {decode} ms", flush=True)
    loop, new = out["mixed_before"].pop("last_logits"), out["mixed"]["last_logits"]
    out["mixed"]["max_abs_diff_vs_loop"] = float((loop - new).abs().max())  # rounding only
    out["mixed"]["max_abs_diff_vs_base"] = float((out["base"]["last_logits"] - new).abs().max())  # adapters act
    for case in out.values():
        case.pop("last_logits", None)
    return out


def peft_rows(model, names: list[str], inp: Inputs, args) -> dict:
    """HF PEFT: the same adapter shapes, mixed through `adapter_names=`, one adapter through `set_adapter`."""
    import peft

    config = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False)
    pm = peft.get_peft_model(model, peft.LoraConfig(**config), adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, peft.LoraConfig(**config))
    pm.eval()
    out = {}
    for case in ("mixed", "one"):
        row_names = [names[i % len(names)] for i in range(args.rows)] if case == "mixed" else None
        pm.set_adapter(names[0])
        extra = {"adapter_names": row_names} if row_names else {}

        def forward(batch, extra=extra):
            return pm(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.pos, use_cache=True,
                      logits_to_keep=1, past_key_values=batch.cache, **extra).logits
        with torch.inference_mode():
            prefill = timed(forward, lambda: inp.prefill([None] * args.rows), args.reps, args.warmup, args.device)
            first = inp.prefill([None] * args.rows)
            forward(first)
            decode = timed(forward, inp.decode(first), args.reps, args.warmup, args.device)
        out[case] = {"prefill_ms": prefill, "decode_ms": decode}
        print(f"peft {case}: prefill {prefill} ms, decode {decode} ms", flush=True)
    return out


def attach_tunelab(model, names: list[str], rank: int) -> None:
    """`len(names)` LoRA adapters r=`rank` on every linear layer, with random non-zero B (seed 2)."""
    from tunelab.methods import get_method
    from tunelab.methods.base import adapter_state

    lora = get_method("lora")
    gen = torch.Generator(device=model.device).manual_seed(2)
    for n in names:
        lora.inject(model, lora.Options(r=rank, alpha=2 * rank, target_modules="all-linear"), n)
        with torch.no_grad():
            for key, p in lora.parameters(model, n).items():
                if ".lora_B." in key:
                    p.copy_(torch.randn(p.shape, generator=gen, device=p.device) * 0.01)
    for p in model.parameters():
        p.requires_grad_(False)
    adapter_state(model).active = ()


def table(t: dict, p: dict | None, adapters: int) -> str:
    """The issue's table: ms (median), tunelab's decode with and without CUDA graphs, the paths it replaced, PEFT."""
    def r(x, y):
        return f"{x / y:.2f}x" if x and y else ""
    p = p or {"mixed": {}, "one": {}}
    lines = ["| ms (median) | tunelab prefill | tunelab decode | decode, no CUDA graphs | before (loop; one: active "
             "path): prefill | before: decode | PEFT prefill | PEFT decode |", "|---|---|---|---|---|---|---|---|"]
    lines.append(f"| {adapters} adapters, mixed | {t['mixed']['prefill_ms']} | {t['mixed']['decode_ms']} "
                 f"| {t['mixed_eager']['decode_ms']} | {t['mixed_before']['prefill_ms']} "
                 f"| {t['mixed_before']['decode_ms']} | {p['mixed'].get('prefill_ms', '')} "
                 f"| {p['mixed'].get('decode_ms', '')} |")
    lines.append(f"| one adapter | {t['one']['prefill_ms']} | {t['one']['decode_ms']} | {t['one_eager']['decode_ms']} "
                 f"| {t['one_active']['prefill_ms']} | {t['one_active']['decode_ms']} "
                 f"| {p['one'].get('prefill_ms', '')} | {p['one'].get('decode_ms', '')} |")
    lines.append(f"| base model | {t['base']['prefill_ms']} | {t['base']['decode_ms']} | {t['base_eager']['decode_ms']} "
                 "| | | | |")
    ratio = [r(t["one"][k], t["mixed"][k]) for k in ("prefill_ms", "decode_ms")]
    before = [r(t["one_active"][k], t["mixed_before"][k]) for k in ("prefill_ms", "decode_ms")]
    peft_ratio = [r(p["one"].get(k), p["mixed"].get(k)) for k in ("prefill_ms", "decode_ms")]
    lines.append(f"| mixed / one adapter (throughput) | {ratio[0]} | {ratio[1]} "
                 f"| {r(t['one_eager']['decode_ms'], t['mixed_eager']['decode_ms'])} | {before[0]} | {before[1]} "
                 f"| {peft_ratio[0]} | {peft_ratio[1]} |")
    lines.append(f"| one adapter / base (time) | {r(t['one']['prefill_ms'], t['base']['prefill_ms'])} "
                 f"| {r(t['one']['decode_ms'], t['base']['decode_ms'])} "
                 f"| {r(t['one_eager']['decode_ms'], t['base_eager']['decode_ms'])} | | | | |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    names = [f"a{i}" for i in range(args.adapters)]
    inp_model = build_model(args.shape, args.device, dtype)
    attach_tunelab(inp_model, names, args.rank)
    inp = Inputs(inp_model, args.rows, args.prompt, args.device)
    result = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "environment": environment(args.device), "settings": vars(args) | {"out": str(args.out)}}
    result["tunelab"] = tunelab_rows(inp_model, names, inp, args)
    save(result, args, None)  # the tunelab rows survive a PEFT part that runs out of time
    del inp_model, inp
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    if not args.no_peft:
        model = build_model(args.shape, args.device, dtype)
        result["peft"] = peft_rows(model, names, Inputs(model, args.rows, args.prompt, args.device), args)
    save(result, args, result.get("peft"))
    print(result["table"])
    return result


def save(result: dict, args, peft_part: dict | None) -> None:
    result["table"] = table(result["tunelab"], peft_part, args.adapters)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def environment(device: str) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft
        env["peft"] = peft.__version__
    except ImportError:
        pass
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


if __name__ == "__main__":
    main()
