"""Training speed, peak memory, MFU and loss parity on a GPU: tunelab's real loop against the open stacks.

Every case runs in a fresh subprocess on the same weights (a Llama-shaped model built from a config with seed 0
and saved once), the same packed data (random token ids written as text for a word-level tokenizer, so every
example is exactly `--seq-len` tokens), the same batch order (tunelab's sampler), AdamW (fused), clipping at
1.0 and a constant learning rate. tunelab goes through `tunelab.train.train` (its one loop, checkpoint-free);
the references step HF models by hand:

- `peft`: HF + PEFT's default (adapter weights fp32 under bf16 autocast, HF's own loss);
- `peft-liger`: HF + PEFT with bf16 adapters and Liger-Kernel (RMSNorm, SwiGLU, RoPE, fused linear
  cross-entropy);
- `hf-full`: plain HF full fine-tuning (bf16 weights); `hf-liger-full`: the same with Liger-Kernel.

Reported per case: tokens/s (median step over `--timed` steps after `--warmup`), peak
`torch.cuda.max_memory_allocated`, MFU (4N FLOPs a token for PEFT, 6N for full, plus 12 * layers * hidden * seq
for attention, over 989 TFLOP/s), the first `--steps` losses, and ratios to the strongest stack.

    python bench/train_gpu.py --cases 1b-lora,1b-full --out bench/results/train_gpu_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpu_cases as cases  # noqa: E402

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16, the datasheet figure MFU is quoted against


def run_case(case: dict, args, work: Path) -> dict:
    """Run one case in a fresh Python process; returns its result row (or an error row)."""
    out = work / f"{case['name']}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, cases.__file__, json.dumps(case), str(work), str(out)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=case.get("timeout", args.case_timeout))
        tail = (done.stdout + done.stderr).strip().splitlines()[-8:]
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timed out after {case.get('timeout', args.case_timeout)} s"}
    if not out.exists():
        return {**case, "error": " | ".join(tail) or f"exit {done.returncode}"}
    row = {**case, **json.loads(out.read_text()), "case_seconds": round(time.perf_counter() - t0, 1)}
    return finish_row(row, args)


def finish_row(row: dict, args) -> dict:
    """Tokens/s, MFU and the timed-step summary from the per-step times."""
    times = row.pop("step_times")
    warmup, count = row.get("warmup", args.warmup), row.get("timed", args.timed)  # a case may set its own
    timed = times[warmup:warmup + count]
    step = statistics.median(timed) if timed else float("nan")
    tokens = row["batch"] * row["seq"]
    shape = cases.SHAPES[row["shape"]]
    per_token = (6 if row["full"] else 4) * matmul_params(shape) + 12 * shape["num_hidden_layers"] * \
        shape["hidden_size"] * row["seq"]
    counted = row.pop("step_tokens", None)
    if counted:  # tokens that are not padding, over the timed steps (what uneven data is judged by)
        row["input_tokens_per_second"] = sum(counted[warmup:warmup + count]) / sum(timed) if timed else float("nan")
    row.update(step_seconds_median=step, tokens_per_second=tokens / step, timed_steps=len(timed),
               mfu=per_token * tokens / step / PEAK_FLOPS, peak_gib=row["peak_memory_bytes"] / 2**30)
    return row


def matmul_params(shape: dict) -> int:
    """Weights that multiply every token: the decoder's projections and the output head (not the lookup)."""
    h, f, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * f) + shape["vocab_size"] * h


STRONGEST = {False: "peft-liger", True: "hf-liger-full"}  # the strongest open stack, PEFT and full
PARITY = {False: "peft", True: "hf-full"}  # whose losses tunelab's should match


def compare(rows: list[dict]) -> None:
    """Add each row's ratios to the strongest stack of its group, and loss parity for tunelab rows."""
    for row in rows:
        if "error" in row:
            continue
        key = lambda r: (r["shape"], r["method"], r["batch"], r["seq"], r.get("checkpointing", False),  # noqa: E731
                         r.get("uneven", False))
        rate = lambda r: r.get("input_tokens_per_second", r["tokens_per_second"])  # noqa: E731  (no padding)
        group = [r for r in rows if key(r) == key(row) and "error" not in r and not r.get("profile")]
        ref = next((r for r in group if r["impl"] == STRONGEST[row["full"]]), None)
        if ref:
            row["speed_vs_strongest"] = rate(row) / rate(ref)
            row["memory_vs_strongest"] = row["peak_memory_bytes"] / ref["peak_memory_bytes"]
        default = next((r for r in group if r["impl"] == "tunelab" and not r.get("set")), None)
        if row.get("set") and default:  # a switch turned off: its effect against tunelab's defaults
            row["speed_vs_tunelab_default"] = row["tokens_per_second"] / default["tokens_per_second"]
            row["memory_vs_tunelab_default"] = row["peak_memory_bytes"] / default["peak_memory_bytes"]
        base = next((r for r in group if r["impl"] == PARITY[row["full"]]), None)
        same_batches = base is not None and base.get("packing", True) == row.get("packing", True)
        if row["impl"] == "tunelab" and same_batches and row["losses"] and base["losses"]:
            n = min(len(row["losses"]), len(base["losses"]))
            rel = [abs(a - b) / abs(b) for a, b in zip(row["losses"][:n], base["losses"][:n])]
            row["loss_parity"] = {"against": base["impl"], "steps": n, "max_rel_diff": max(rel),
                                  "within_1pct": max(rel) <= 0.01}


def table(rows: list[dict]) -> str:
    lines = [f"{'case':34} {'tok/s':>9} {'GiB':>7} {'MFU':>6} {'xspeed':>7} {'xmem':>6} {'parity':>8}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:34} ERROR {str(r['error'])[-150:]}")
            continue
        par = r.get("loss_parity", {}).get("max_rel_diff")
        speed, memory = r.get("speed_vs_strongest", float("nan")), r.get("memory_vs_strongest", float("nan"))
        lines.append(f"{r['name']:34} {r.get('input_tokens_per_second', r['tokens_per_second']):9.0f} {r['peak_gib']:7.2f} {r['mfu']:6.3f} "
                     f"{speed:7.2f} {memory:6.2f} {'' if par is None else f'{par:.4f}':>8}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="1b-lora,1b-full", help=f"comma-separated groups: {', '.join(cases.GROUPS)}")
    p.add_argument("--only", default=None, help="comma-separated case names to keep within the groups")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per case (losses compared over all)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timed", type=int, default=10)
    p.add_argument("--work", default="/tmp/tunelab-bench")
    p.add_argument("--case-timeout", type=int, default=300)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    only = set(args.only.split(",")) if args.only else None
    for group in args.cases.split(","):
        for case in cases.GROUPS[group]:
            if only and case["name"] not in only:
                continue
            case = {"steps": args.steps, **case, "group": group}
            rows.append(run_case(case, args, work))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)
            write(rows, args)  # after every case: a run cut short still leaves its results
    print(table(rows))


def write(rows: list[dict], args) -> None:
    compare(rows)
    result = {"command": " ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:]),
              "environment": cases.versions(), "settings": vars(args), "shapes": cases.SHAPES, "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
