"""Scaling over the GPUs of one machine (issue 13): tunelab's one loop under torchrun on N GPUs against one
GPU, for Llama-shaped 1B and 8B models (bench/train_gpu_cases.py), LoRA and full fine-tuning.

Weak scaling with the same global batch on both sides, so the losses can be compared step by step:
- N GPUs: `--strategy fsdp` (or ddp), micro-batch B, grad_accum N: each rank runs one micro-batch of B a step;
- 1 GPU: the plain loop, micro-batch B, grad_accum N: the same N*B examples a step, in N micro-batches.
Reported per case: tokens/s on 1 and N GPUs (median step after `--warmup`), scaling efficiency
tps_N / (N * tps_1), the MFU per GPU (model FLOPs as bench/train_gpu.py counts them, against 989 TFLOP/s), the
peak memory of every GPU, and the loss parity over the first `--steps` (20) steps. A side that fails (one GPU
out of memory) is recorded with its error, and the other side's figures are kept.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).

    PYTHONPATH=src python3 bench/train_multi_gpu.py --nproc 8 --out bench/results/train_multi_gpu_h200x8.json
    PYTHONPATH=src python3 bench/train_multi_gpu.py --nproc 8 --cases 8b-full --out ...   # one case
    PYTHONPATH=src python3 bench/train_multi_gpu.py --nproc 2 --tiny    # CPU smoke test (gloo)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_dist_common as common  # noqa: E402
import train_gpu_cases as cases  # noqa: E402
from train_gpu import PEAK_FLOPS, matmul_params  # noqa: E402

# name: (shape, method, micro-batch, seq, strategy, extra case keys)
CASES = {
    "1b-lora": ("1b", "lora", 8, 2048, "fsdp", {}),
    "1b-full": ("1b", "full", 8, 2048, "fsdp", {}),
    "1b-lora-ddp": ("1b", "lora", 8, 2048, "ddp", {}),
    "1b-full-ddp": ("1b", "full", 8, 2048, "ddp", {}),  # weights, gradients and AdamW state replicated (~20 GB)
    "8b-lora": ("8b", "lora", 4, 2048, "fsdp", {}),
    "8b-lora-ddp": ("8b", "lora", 4, 2048, "ddp", {}),  # the frozen base replicated (16 GB in bf16 per GPU)
    # 4x2048 per GPU, the shape. Full fine-tuning cases train bf16 weights and AdamW moments unless they
    # say master_weights (train_dist_common.case); with fp32 masters one H200 still held 8B at this shape with
    # checkpointing (123.3 GiB); a side that runs out of memory is recorded with its error
    "8b-full": ("8b", "full", 4, 2048, "fsdp", {"checkpointing": True}),
    # --master-weights: fp32 shards of the weights, gradients and AdamW moments (FSDP2), fp32 masters (DDP, 1 GPU)
    "8b-full-master": ("8b", "full", 4, 2048, "fsdp", {"checkpointing": True, "set": {"master_weights": True}}),
    # the same with every block gathered again for its backward (FSDP2's default; auto keeps the forward's)
    "8b-full-master-reshard": ("8b", "full", 4, 2048, "fsdp", {"checkpointing": True, "set": {
        "master_weights": True, "reshard_after_forward": "always"}}),
    "1b-full-master-ddp": ("1b", "full", 8, 2048, "ddp", {"set": {"master_weights": True}}),
}
TINY = {"tiny-lora": ("tiny", "lora", 2, 64, "fsdp", {}), "tiny-full": ("tiny", "full", 2, 64, "fsdp", {}),
        "tiny-lora-ddp": ("tiny", "lora", 2, 64, "ddp", {})}


def measure(name: str, nproc: int, args, work: Path) -> dict:
    shape, method, batch, seq, strategy, extra = {**CASES, **TINY}[name]
    spec = common.case(f"{name}-{batch}x{seq}", shape, method, batch, seq, args.steps, accum=nproc, **extra)
    one = {"error": "not run (--n-gpu-only)"} if args.n_gpu_only else \
        common.run_case({**spec, "name": spec["name"] + "-1gpu"}, work, None, args.case_timeout)
    many = common.run_case({**spec, "name": f"{spec['name']}-{nproc}gpu-{strategy}",
                            "set": {**spec.get("set", {}), "strategy": strategy}}, work, nproc, args.case_timeout)
    row = {"case": name, "method": method, "strategy": strategy, "nproc": nproc, "micro_batch": batch, "seq": seq,
           "global_batch": batch * nproc, **extra}
    if "error" in many:
        return row | {"one_gpu_error": one.get("error"), "n_gpu_error": many.get("error")}
    tokens = batch * nproc * seq  # a step's tokens, on both sides
    shape_ = cases.SHAPES[shape]
    per_token = (6 if method == "full" else 4) * matmul_params(shape_) + \
        12 * shape_["num_hidden_layers"] * shape_["hidden_size"] * seq
    b = common.throughput(many, tokens, args.warmup)
    row |= {"n_gpu": b | {"mfu_per_gpu": per_token * b["tokens_per_second"] / nproc / PEAK_FLOPS,
                          "peak_memory_per_gpu": many["peak_memory_per_rank"], "world_size": many["world_size"]}}
    if "error" in one:
        return row | {"one_gpu_error": one["error"]}
    a = common.throughput(one, tokens, args.warmup)
    return row | {
        "one_gpu": a | {"mfu": per_token * a["tokens_per_second"] / PEAK_FLOPS,
                        "peak_memory_bytes": one["peak_memory_bytes"]},
        "speedup": b["tokens_per_second"] / a["tokens_per_second"],
        "scaling_efficiency": b["tokens_per_second"] / (nproc * a["tokens_per_second"]),
        "loss_parity": common.loss_parity(one["losses"], many["losses"], 20),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, required=True, help="GPUs (processes) of the distributed side")
    p.add_argument("--cases", default=None, help=f"comma-separated: {', '.join(CASES)} (default: all but ddp)")
    p.add_argument("--n-gpu-only", action="store_true", help="skip the one-GPU side (a case one GPU cannot hold)")
    p.add_argument("--tiny", action="store_true", help="tiny Llamas on the CPU (gloo): a smoke test")
    args = common.parse_run_args(p, case_timeout=580)
    names = (args.cases.split(",") if args.cases else
             list(TINY) if args.tiny else [n for n in CASES if not n.endswith("ddp")])
    work, rows = Path(args.work), []
    for name in names:
        rows.append(measure(name, args.nproc, args, work))
        payload = {"command": " ".join(["python3", "bench/train_multi_gpu.py", *sys.argv[1:]]),
                   "environment": cases.versions() | {"gpus": args.nproc, **common.NVLS_OFF},
                   "settings": vars(args), "shapes": {k: cases.SHAPES[k] for k in ("1b", "8b")}, "rows": rows}
        common.write(Path(args.out) if args.out else work / "train_multi_gpu.json", payload)


if __name__ == "__main__":
    os.environ.update(common.NVLS_OFF)
    main()
