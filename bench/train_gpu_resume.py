"""Resume with the speed switches on: a run of N steps saving every N/2, then the same run resumed from its
middle checkpoint; the resumed steps' losses are compared with the uninterrupted run's (each run in its own
process, through `tunelab.train.train`).

    python bench/train_gpu_resume.py --shape 1b --batch 2 --seq 512 --steps 6 --out resume.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpu_cases as cases  # noqa: E402


def one_run(args, resume: bool) -> None:
    import torch
    from tunelab.config import RunConfig
    from tunelab.train import train

    model_dir, data = cases.assets(args.shape, Path(args.work), args.steps * args.batch * args.seq + 4096)
    cuda = torch.cuda.is_available()
    cfg = RunConfig(model=str(model_dir), data=str(data), method="lora", method_options=cases.LORA,
                    output=str(Path(args.work) / "resume-run"), seed=0, max_steps=args.steps, batch_size=args.batch,
                    seq_len=args.seq, packing=True, schedule="cosine", warmup_steps=1, lr=cases.LR["lora"],
                    val_fraction=0.0, save_every=args.steps // 2, dtype="bfloat16" if cuda else "float32",
                    device="cuda" if cuda else "cpu", force=not resume, resume=resume)
    train(cfg, progress=False)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="1b", choices=sorted(cases.SHAPES))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--work", default="/tmp/tunelab-bench")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", choices=["fresh", "resume"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return one_run(args, resume=args.worker == "resume")
    out = Path(args.work) / "resume-run"
    base = [sys.executable, __file__, *sys.argv[1:]]
    subprocess.run([*base, "--worker", "fresh"], check=True)
    full = losses(out)
    middle = args.steps // 2
    for ckpt in (out / "checkpoints").iterdir():  # keep only the middle checkpoint, as if stopped there
        if ckpt.name != f"step-{middle}":
            shutil.rmtree(ckpt)
    subprocess.run([*base, "--worker", "resume"], check=True)
    resumed = losses(out)
    steps = list(range(middle + 1, args.steps + 1))
    worst = max(abs(resumed[s] - full[s]) / abs(full[s]) for s in steps)
    result = {"command": " ".join(["python", "bench/train_gpu_resume.py", *sys.argv[1:]]),
              "environment": cases.versions(), "uninterrupted": full, "resumed": resumed,
              "compared_steps": steps, "max_rel_diff": worst,
              "bit_identical": all(resumed[s] == full[s] for s in steps)}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
