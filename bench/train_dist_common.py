"""What bench/train_fsdp_ws1.py and bench/train_multi_gpu.py share: running one case of bench/train_gpu_cases.py
through tunelab's real loop, plainly or under torchrun, and reading its result.

As a script (`python train_dist_common.py CASE_JSON WORK OUT`) it is the worker: every rank trains; rank 0
writes the result JSON to OUT. The drivers start it plainly (one process, no torch.distributed) or with
`python -m torch.distributed.run --standalone --nproc-per-node N` (FSDP2 or DDP through the same loop).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# multicast-capable NVLink switches are not lent: keep NCCL, torch and NVSHMEM off NVLS
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


PROFILE_ENV = "TUNELAB_BENCH_PROFILE"  # set (by --profile): every worker runs under torch.profiler


def parse_run_args(parser, case_timeout: int):
    """The arguments every distributed bench shares (steps, warm-up, work dir, per-case timeout, output, and
    `--profile`: every case under torch.profiler, few steps, e.g. --steps 6 --warmup 2), parsed."""
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--work", default="/tmp/tunelab-bench")
    parser.add_argument("--case-timeout", type=int, default=case_timeout)
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", action="store_true",
                        help=f"kernel tables to $OUT or WORK (profile-<case>-rank<r>.txt); sets {PROFILE_ENV}")
    args = parser.parse_args()
    if args.profile:
        os.environ[PROFILE_ENV] = "1"
    return args


def case(name: str, shape: str, method: str, batch: int, seq: int, steps: int, **extra) -> dict:
    """A bench/train_gpu_cases.py case of tunelab's loop (`set`: RunConfig values such as strategy). Full
    fine-tuning trains bf16 weights and moments unless the case sets `master_weights` (its *-master cases)."""
    if method == "full":
        extra["set"] = {"master_weights": False, **extra.get("set", {})}
    return {"name": name, "impl": "tunelab", "shape": shape, "method": method, "batch": batch, "seq": seq,
            "full": method == "full", "steps": steps, **extra}


def env() -> dict:
    out = {**os.environ, **NVLS_OFF, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), str(HERE), out.get("PYTHONPATH")]))
    return out


def run_case(spec: dict, work: Path, nproc: int | None, timeout: float) -> dict:
    """Run `spec` plainly (`nproc` None) or under torchrun on `nproc` processes; its result, or {"error": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        worker = [str(HERE / "train_dist_common.py"), json.dumps(spec), str(work), str(out)]
        launch = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                           str(nproc)]
        cmd = [sys.executable, *launch, *worker]
        print(f"[{spec['name']}] {'plain' if nproc is None else f'torchrun x{nproc}'}", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if done.returncode != 0 or not out.exists():
            return {"error": f"exit {done.returncode}: {done.stderr.strip()[-1500:]}"}
        return json.loads(out.read_text())


def throughput(result: dict, tokens_per_step: int, warmup: int) -> dict:
    """tokens/s from the median step time after `warmup` steps, with the step times it came from."""
    times = result["step_times"][warmup:] or result["step_times"]
    step = statistics.median(times)
    return {"tokens_per_second": tokens_per_step / step, "step_seconds_median": step, "timed_steps": len(times)}


def loss_parity(a: list[float], b: list[float], steps: int) -> dict:
    """The largest relative difference of the first `steps` losses of two runs."""
    n = min(steps, len(a), len(b))
    rel = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a[:n], b[:n])]
    return {"steps": n, "max_rel_diff": max(rel) if rel else None, "first": a[:3], "other_first": b[:3]}


def write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    print(json.dumps(payload, indent=1))


def worker() -> None:
    """Train one case on this rank; rank 0 writes the result."""
    from train_gpu_cases import assets, run_tunelab

    spec, work, out = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    tokens = spec["steps"] * spec["batch"] * spec.get("accum", 1) * spec["seq"] + 4096
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        assets(spec["shape"], work, tokens)  # made once, by one process per machine
    if "WORLD_SIZE" in os.environ:
        import torch.distributed as dist

        from tunelab.train.distributed import init_world

        init_world("cuda" if spec["shape"] != "tiny" else "cpu", 1800)
        dist.barrier()  # the others wait for the assets
    model_dir, data = assets(spec["shape"], work, tokens)
    spec = {**spec, "set": {"overwrite": True, **spec.get("set", {})}}
    runner = lambda: run_tunelab(spec, model_dir, data, work)  # noqa: E731
    if os.environ.get(PROFILE_ENV):  # each rank's kernel table to $OUT/profile-<case>-rank<r>.txt
        from train_gpu_cases import profiled

        result = profiled(runner, {**spec, "name": f"{spec['name']}-rank{os.environ.get('RANK', '0')}"}, work)
    else:
        result = runner()
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(result))


if __name__ == "__main__":
    worker()
    if "WORLD_SIZE" in os.environ:  # as `python -m tunelab` under torchrun (tunelab/__main__.py): leave the process
        # group, then exit without the interpreter's teardown, which can abort a rank of a finished run (SIGSEGV
        # or SIGABRT in the communication library's threads) while rank 0 is still writing its artifact
        from tunelab.train.distributed import shutdown

        shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
