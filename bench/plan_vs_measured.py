"""Predicted (`tunelab.measure.plan`) vs measured peak training memory, per model, method, batch and sequence.

Each measurement runs in a fresh subprocess: the model is built from its config with random weights on the
target device in the run dtype, the method is injected through `tunelab.methods.get_method(name).inject` (qlora
quantises the base to NF4 through torchao, on CPU as on GPU), gradient checkpointing is enabled as tunelab's run
setup does, then 3 training steps run through tunelab's own `train.loop.accumulate_window` (under bf16 autocast
on CUDA), with gradient clipping, AdamW (fused on CUDA) and `zero_grad(set_to_none=True)`.

Measured peak: on CUDA `torch.cuda.max_memory_allocated()` over the steps (reset after the model is built); on
CPU the weights plus the peak of the CPU allocator's running total, read from `torch.profiler` memory events (the
same quantity), with the peak RSS growth reported beside it. The prediction compared is the plan's
`peak_tensor_bytes` (its total without the fixed CUDA overhead).

    python bench/plan_vs_measured.py                       # CPU: small Llama and GPT-2 configs
    python bench/plan_vs_measured.py --models llama-1b,llama-8b --batch-sizes 1,4 --seq-lens 512,2048  # H200

Results: bench/results/plan_vs_measured_<cpu|cuda>.json with the command line, hardware, versions, and per
(model, method, batch, seq) the prediction, the measurement and their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LLAMA = {"model_type": "llama", "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192}
CONFIGS = {
    # small configs that run on a laptop CPU in seconds
    "llama-tiny": {**LLAMA, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
                   "num_key_value_heads": 2, "intermediate_size": 688, "vocab_size": 8000},
    "llama-small": {**LLAMA, "hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8,
                    "num_key_value_heads": 4, "intermediate_size": 1376, "vocab_size": 16000},
    "gpt2-tiny": {"model_type": "gpt2", "n_embd": 256, "n_layer": 4, "n_head": 8, "n_positions": 1024,
                  "vocab_size": 8000, "bos_token_id": 0, "eos_token_id": 0},
    # Llama-3.2-1B and Llama-3-8B shapes (random weights; nothing is downloaded)
    "llama-1b": {**LLAMA, "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
                 "tie_word_embeddings": True, "rope_theta": 500000.0},
    "llama-8b": {**LLAMA, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                 "rope_theta": 500000.0},
}
# plan option -> the method's own option, per method
LORA_KEYS = {"r": "r", "target_modules": "target_modules", "lora_dropout": "dropout"}
VIRTUAL_KEYS = {"num_virtual_tokens": "num_virtual_tokens"}
METHOD_KEYS = {"lora": LORA_KEYS, "dora": LORA_KEYS, "qlora": LORA_KEYS, "prompt": VIRTUAL_KEYS,
               "prefix": VIRTUAL_KEYS, "bitfit": {"bitfit_include_norms": "include_norms"},
               "adapter": {"bottleneck": "bottleneck_size", "adapter_variant": "variant"}}


def model_config(name: str) -> dict:
    """An embedded config by name, or a config.json / model dir on disk."""
    if name in CONFIGS:
        return dict(CONFIGS[name])
    path = Path(name)
    return json.loads((path / "config.json" if path.is_dir() else path).read_text())


# --- the measured step (runs in a worker subprocess) -----------------------------------------------------

def build(job: dict):
    """(model, method, device, dtype): the random-weight model with the job's method injected."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.methods import get_method
    from tunelab.methods.base import mark_trainable
    from tunelab.train.setup import enable_gradient_checkpointing

    device = torch.device(job["device"])
    dtype = getattr(torch, job["dtype"])
    config = AutoConfig.for_model(**model_config(job["model"]))
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).train()
    name = job["method"]
    method = get_method(name)
    keys = METHOD_KEYS.get(name, {})
    opts = {keys[k]: v for k, v in job["method_options"].items() if k in keys}
    if name == "bitfit" and "include_norms" not in opts:  # the plan's default: norms when there are no biases
        opts["include_norms"] = not any(n.endswith(".bias") for n, _ in model.named_parameters())
    method.inject(model, method.Options(**opts), "default")
    mark_trainable(model, method.parameters(model, "default"))
    if job["gradient_checkpointing"]:  # after inject, as tunelab's run setup does
        enable_gradient_checkpointing(model)
    return model, method, device, dtype


def optimizer_for(model, method, device):
    """AdamW over the method's groups, as `tunelab.train.optim.build_optimizer` builds it."""
    import torch

    groups = [g for g in method.param_groups(model, "default", 1e-4, 0.0) if g["params"]]
    return torch.optim.AdamW(groups, **({"fused": True} if device.type == "cuda" else {}))


def train_steps(model, method, device, dtype, job: dict) -> None:
    """`job["steps"]` optimizer steps on random tokens through tunelab's own `train.loop.accumulate_window`
    (forward, fp32 summed loss, fused as the loop's default `fused_loss`, backward; bf16 autocast when the job
    asks), then clipping, AdamW, zero_grad. Results in bench/results from before the fused loss used the plain one."""
    import contextlib

    import torch

    from tunelab.train.loop import accumulate_window

    opt = optimizer_for(model, method, device)
    params = [p for g in opt.param_groups for p in g["params"]]
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if job["autocast"]
                else contextlib.nullcontext)
    vocab = model.config.vocab_size
    for _ in range(job["steps"]):
        ids = torch.randint(0, vocab, (job["batch_size"], job["seq_len"]), device=device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        accumulate_window(model, [batch], "causal-lm", autocast=autocast, fused=True)  # the loop's default loss
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def measure(job: dict) -> dict:
    """Build, inject, train `job["steps"]` steps and return the measured peaks."""
    import torch

    model, method, device, dtype = build(job)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        train_steps(model, method, device, dtype, job)
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return {"measured_peak_bytes": torch.cuda.max_memory_allocated(), "source": "cuda_max_memory_allocated",
                "reserved_peak_bytes": torch.cuda.max_memory_reserved(), "device_used_bytes": total - free}
    return measure_cpu(model, method, device, dtype, job)


def measure_cpu(model, method, device, dtype, job: dict) -> dict:
    """CPU: weights + the peak of the allocator's running total (profiler memory events), and peak RSS growth."""
    from torch.profiler import ProfilerActivity, profile

    from tunelab.measure.plan_model import storage_bytes

    base = storage_bytes(model)
    rss0 = _reset_peak_rss()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_steps(model, method, device, dtype, job)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return {"measured_peak_bytes": base + peak, "source": "cpu_allocator_peak (torch.profiler)",
            "weights_buffers_bytes": base, "rss_growth_bytes": _peak_rss() - rss0}


def _reset_peak_rss() -> int:
    """Reset the kernel's peak RSS (VmHWM) where allowed, and return the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


# --- the prediction and the driver ------------------------------------------------------------------------

def predict(job: dict) -> dict:
    """The plan's estimate for the job, on the runtime the measurement uses."""
    from tunelab.measure.plan import estimate
    from tunelab.measure.plan_formulas import runtime
    from tunelab.measure.plan_methods import PlanOptions, build_strategy
    from tunelab.measure.plan_model import describe_model

    info = describe_model(model_config(job["model"]), "causal-lm")
    rt = runtime(job["device"], 2 if job["dtype"] != "float32" else 4)
    if job["autocast"] != rt.autocast:  # e.g. bf16 autocast emulated on CPU (Llama blocks only)
        rt = dataclasses.replace(rt, autocast=job["autocast"])
    st = build_strategy(job["method"], info, PlanOptions(**job["method_options"]), rt)
    return estimate(st, info, rt, job["batch_size"], job["seq_len"], job["gradient_checkpointing"]).model_dump()


def run_job(job: dict, timeout: int) -> dict:
    """Measure `job` in a fresh interpreter (clean allocator and peak counters)."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(job)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:300]}
    return json.loads(lines[-1])


def skip_reason(job: dict, predicted: dict) -> str | None:
    """Why a job cannot run here (what the plan says tunelab refuses, a method not registered), or None."""
    from tunelab.methods import all_methods

    if not predicted["supported"]:
        return "; ".join(predicted["notes"])
    if job["method"] not in all_methods():
        return f"method {job['method']!r} is not registered in this tunelab"
    return None


def environment(device: str) -> dict:
    import torch
    import transformers

    hw = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count()}
    if device == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(0)
        hw["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return {"hardware": hw, "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                          "transformers": transformers.__version__}}


def jobs_from(args) -> list[dict]:
    targets = args.target_modules
    if targets and targets != "all-linear":
        targets = targets.split(",")
    opts = {"r": args.r} | ({"target_modules": targets} if targets else {})
    return [{"model": m, "method": meth, "batch_size": b, "seq_len": s, "dtype": args.dtype, "device": args.device,
             "gradient_checkpointing": ckpt, "autocast": args.autocast, "steps": args.steps,
             "method_options": {k: v for k, v in opts.items() if k in METHOD_KEYS.get(meth, {})}}
            for m in args.models.split(",") for meth in args.methods.split(",")
            for b in map(int, args.batch_sizes.split(",")) for s in map(int, args.seq_lens.split(","))
            for ckpt in ([False, True] if args.gradient_checkpointing == "both"
                         else [args.gradient_checkpointing == "on"])]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None, help="embedded names (%s) or config paths" % ", ".join(CONFIGS))
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--seq-lens", default="128,512")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--gradient-checkpointing", choices=["off", "on", "both"], default="off")
    ap.add_argument("--autocast", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast (default: as tunelab, on for CUDA + bf16)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--target-modules", default=None, help="comma-separated names or all-linear (LoRA family)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--output", default=None)
    args = ap.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.models = args.models or ("llama-1b,llama-8b" if args.device == "cuda" else "llama-tiny,llama-small,gpt2-tiny")
    if args.autocast is None:
        args.autocast = args.device == "cuda" and args.dtype == "bfloat16"
    return args


def summary_line(row: dict) -> str:
    predicted, measured = row["predicted"]["peak_tensor_bytes"], row.get("measured_peak_bytes", 0)
    return (f"{row['model']:12} {row['method']:7} b={row['batch_size']:<3} s={row['seq_len']:<5} "
            f"ckpt={int(row['gradient_checkpointing'])} predicted={predicted / 2**20:10.1f}MiB "
            f"measured={measured / 2**20:10.1f}MiB ratio={row.get('ratio', '-')} "
            f"{row.get('skipped') or row.get('error') or ''}")


def main(argv=None) -> None:
    args = parse_args(argv)
    default_dtype = "bfloat16" if args.device == "cuda" else "float32"
    suffix = ("" if args.dtype == default_dtype else f"_{args.dtype}") + (
        "_autocast" if args.autocast and args.device == "cpu" else "")
    out = Path(args.output or Path(__file__).parent / "results" / f"plan_vs_measured_{args.device}{suffix}.json")
    rows = []
    for job in jobs_from(args):
        row = {**job, "predicted": predict(job)}
        reason = skip_reason(job, row["predicted"])
        started = time.perf_counter()
        row |= {"skipped": reason} if reason else run_job(job, args.timeout)
        row["seconds"] = round(time.perf_counter() - started, 1)
        if "measured_peak_bytes" in row:
            row["ratio"] = round(row["predicted"]["peak_tensor_bytes"] / row["measured_peak_bytes"], 4)
        rows.append(row)
        print(summary_line(row), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join([sys.executable, *sys.argv]), **environment(args.device), "results": rows}
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(measure(json.loads(sys.argv[2]))))
    else:
        main()
