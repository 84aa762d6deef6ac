"""The cost of the distributed path on one GPU: tunelab's loop under torchrun with world size 1 and FSDP2
(`fully_shard` per block, bf16 mixed precision, fp32 reduce) against the plain one-process loop, on the same
model, data, batches and settings (bench/train_gpu_cases.py: a Llama-shaped 1B built from a config, packed
random tokens, constant learning rate). The target: FSDP2 at world size 1 costs at most 5% tokens/s. Each
one-process torchrun run of `--strategies` is measured: `fsdp` forces FSDP2; `auto` is what a user gets (no
wrapper on one process, the distributed loop's per-step agreement and DCP checkpoints all the same).

    PYTHONPATH=src python3 bench/train_fsdp_ws1.py --out bench/results/train_fsdp_ws1_h200.json
    PYTHONPATH=src python3 bench/train_fsdp_ws1.py --tiny     # CPU smoke test (gloo), seconds

Reported per case (1b-lora, 1b-full): tokens/s of each path (median step after `--warmup`), the overhead
1 - torchrun / plain of each strategy, peak memory of each, and the loss parity over all steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_dist_common as common  # noqa: E402
import train_gpu_cases as cases  # noqa: E402


def specs(tiny: bool, steps: int, methods: str) -> list[dict]:
    shape, batch, seq = ("tiny", 2, 64) if tiny else ("1b", 8, 2048)
    return [common.case(f"{shape}-{m}-{batch}x{seq}", shape, m, batch, seq, steps) for m in methods.split(",")]


def measure(spec: dict, args, work: Path) -> dict:
    """The plain loop, then torchrun with one process for each `--strategies` entry (`fsdp`: FSDP2 forced;
    `auto`: what a one-process torchrun run gets, no wrapper), on the same case."""
    plain = common.run_case({**spec, "name": spec["name"] + "-plain"}, work, None, args.case_timeout)
    row = {"case": spec["name"], "method": spec["method"], "batch": spec["batch"], "seq": spec["seq"]}
    if "error" in plain:
        return row | {"plain_error": plain["error"]}
    tokens = spec["batch"] * spec["seq"]
    a = common.throughput(plain, tokens, args.warmup)
    row["plain"] = a | {"peak_memory_bytes": plain["peak_memory_bytes"]}
    for strategy in args.strategies.split(","):
        key = "fsdp_ws1" if strategy == "fsdp" else f"{strategy}_ws1"
        dist = common.run_case({**spec, "name": f"{spec['name']}-{strategy}-ws1", "set": {"strategy": strategy}},
                               work, 1, args.case_timeout)
        if "error" in dist:
            row[key] = {"error": dist["error"]}
            continue
        b = common.throughput(dist, tokens, args.warmup)
        row[key] = b | {"peak_memory_bytes": dist["peak_memory_bytes"], "strategy": dist["strategy"],
                        "world_size": dist["world_size"], "overhead": 1 - b["tokens_per_second"] / a["tokens_per_second"],
                        "within_5_percent": b["tokens_per_second"] >= 0.95 * a["tokens_per_second"],
                        "loss_parity": common.loss_parity(plain["losses"], dist["losses"], spec["steps"])}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU (gloo): a smoke test")
    p.add_argument("--methods", default="lora,full", help="comma-separated methods to measure [lora,full]")
    p.add_argument("--strategies", default="fsdp,auto",
                   help="one-process torchrun runs to set against the plain loop [fsdp,auto]")
    args = common.parse_run_args(p, case_timeout=400)
    work = Path(args.work)
    rows = []
    for spec in specs(args.tiny, args.steps, args.methods):
        rows.append(measure(spec, args, work))
        payload = {"command": " ".join(["python3", "bench/train_fsdp_ws1.py", *sys.argv[1:]]),
                   "environment": cases.versions(), "settings": vars(args), "rows": rows}
        # after every case: a run cut short still leaves what it measured
        common.write(Path(args.out) if args.out else work / "train_fsdp_ws1.json", payload)


if __name__ == "__main__":
    main()
