"""Markdown tables from bench/train_gpu.py results: the case table (references, tunelab before and now), the
switches' measured effects, and loss parity. The README's and docs/gpu.md's figures are printed by this script.

    python bench/train_gpu_report.py bench/results/train_gpu_h200_before.json \
        bench/results/train_gpu_h200_ablations.json bench/results/train_gpu_h200.json

Later files win for a case measured in several runs; each figure names the run (file) it comes from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CASES = [  # (label, shape-method-batchxseq tag, PEFT default / plain HF impl, strongest impl)
    ("1B LoRA, 8x2048", "1b-lora-8x2048", "peft", "peft-liger"),
    ("8B LoRA, 4x2048", "8b-lora-4x2048", "peft", "peft-liger"),
    ("1B full FT, 8x2048", "1b-full-8x2048", "hf", "hf-liger"),
    ("1B DoRA, 8x2048", "1b-dora-8x2048", "peft", "peft-liger"),
    ("1B IA3, 8x2048", "1b-ia3-8x2048", "peft", "peft-liger"),
]
SWITCHES = [("adapter_autocast", "no-adapter-autocast"), ("fused_loss", "no-fused-loss"),
            ("liger_kernels", "no-liger"), ("all three", "all-off")]


def load(paths: list[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(rows by name from every run, later runs winning; rows by name of the first run: tunelab 'before')."""
    rows, first = {}, {}
    for i, path in enumerate(paths):
        for row in json.loads(Path(path).read_text())["rows"]:
            if "error" in row or row.get("profile"):
                continue
            row["file"] = Path(path).name
            (first if i == 0 else rows)[row["name"]] = row
    return rows, first


def cell(row: dict | None) -> str:
    if row is None:
        return "not run"
    return f"{row['tokens_per_second'] / 1000:.1f}k tok/s, {row['peak_gib']:.1f} GiB, MFU {row['mfu']:.2f}"


def parity(row: dict, ref: dict | None) -> str:
    if ref is None or not row.get("losses") or not ref.get("losses"):
        return "n/a"
    n = min(len(row["losses"]), len(ref["losses"]))
    worst = max(abs(a - b) / abs(b) for a, b in zip(row["losses"][:n], ref["losses"][:n]))
    return f"{worst * 100:.3f}% over {n} steps"


def case_table(rows: dict, before: dict) -> str:
    out = ["| case | HF + PEFT default (plain HF for full) | strongest stack (PEFT bf16 adapters + Liger; HF + Liger "
           "for full) | tunelab before | tunelab now | tunelab / strongest | loss vs PEFT default / plain HF |",
           "|---|---|---|---|---|---|---|"]
    for label, tag, base, strong in CASES:
        b, s = rows.get(f"{tag}-{base}"), rows.get(f"{tag}-{strong}")
        now = rows.get(f"{tag}-tunelab")
        old = before.get(f"{tag}-tunelab") or rows.get(f"{tag}-tunelab-all-off")
        ratio = (f"{now['tokens_per_second'] / s['tokens_per_second']:.2f}x speed, "
                 f"{now['peak_memory_bytes'] / s['peak_memory_bytes']:.2f}x memory") if now and s else "n/a"
        out.append(f"| {label} | {cell(b)} | {cell(s)} | {cell(old)} | {cell(now)} | {ratio} | "
                   f"{parity(now, b) if now else 'n/a'} |")
    return "\n".join(out)


def switch_table(rows: dict) -> str:
    out = ["| switch turned off | 1B LoRA 8x2048: tok/s, peak | vs all on | 1B full 8x2048: tok/s, peak | vs all on |",
           "|---|---|---|---|---|"]
    for key, suffix in SWITCHES:
        cells = []
        for tag in ("1b-lora-8x2048", "1b-full-8x2048"):
            off, on = rows.get(f"{tag}-tunelab-{suffix}"), rows.get(f"{tag}-tunelab")
            on_same_run = next((r for r in [on] if r and off and r["file"] == off["file"]), None)
            if off is None or on_same_run is None:
                cells += [cell(off), "n/a"]
                continue
            cells += [cell(off), f"{off['tokens_per_second'] / on['tokens_per_second']:.2f}x speed, "
                                 f"{off['peak_memory_bytes'] / on['peak_memory_bytes']:.2f}x memory"]
        out.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    paths = sys.argv[1:]
    rows, before = load(paths)
    print("## Cases (each figure from the run named in its row's `file`)\n")
    print(case_table(rows, before))
    for path in paths:  # the switches are compared within the run that measured them
        found = {r["name"]: {**r, "file": Path(path).name} for r in json.loads(Path(path).read_text())["rows"]
                 if "error" not in r and not r.get("profile") and r["impl"] == "tunelab"}
        if any(r.get("set") for r in found.values()):
            print(f"\n## Switches ({Path(path).name})\n")
            print(switch_table(found))
    print("\nfiles: " + ", ".join(f"{r['name']}: {r['file']}" for r in rows.values()))


if __name__ == "__main__":
    main()
