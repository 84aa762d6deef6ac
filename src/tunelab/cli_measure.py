"""The measuring commands of the CLI: `compare` (train every strategy on the same model and data, measure the
trade-offs, recommend one) and `plan` (predict training memory before anything trains). Typed functions
registered on the app by `cli.py`; their docstrings are their `--help`. Imports of tunelab's layers sit inside
the commands, as in `cli.py`, so `--help` does not load torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunelab.interrupts import leaves

# The model and data options, shared with `train` and `eval`.
Model = Annotated[Optional[str], typer.Option(help="Local HF model dir or alias (smollm2-135m, minilm-l6).")]
Data = Annotated[Optional[str], typer.Option(help="JSONL/CSV/Parquet file, or 'default'.")]


def compare(
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML of compare options; flags override it.")] = None,
    model: Model = None,
    data: Data = None,
    task: Annotated[Optional[str], typer.Option(help="causal-lm or classification.")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods (default: all registered).")] = None,
    budget: Annotated[Optional[str], typer.Option(help="steps (default), epochs or tokens: which sets the budget.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Optimizer steps per run (--budget steps).")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Epochs per run (--budget epochs).")] = None,
    tokens: Annotated[Optional[int], typer.Option(min=1, help="Non-pad input tokens per run (--budget tokens).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Micro-batch size.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(min=1, help="Maximum tokens per example.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="First random seed.")] = None,
    seeds: Annotated[Optional[int], typer.Option(min=1, help="Seeds per strategy: mean and spread over them.")] = None,
    tune_lr: Annotated[Optional[bool], typer.Option("--tune-lr/--no-tune-lr", help="Search each strategy's lr first "
                                                    "(default: on with a GPU).")] = None,
    lr_grid: Annotated[Optional[str], typer.Option(help="Factors of the default lr to search, e.g. 0.3,1,3.")] = None,
    tune_fraction: Annotated[Optional[float], typer.Option(help="Share of the budget each searched lr trains.")] = None,
    lr_for: Annotated[Optional[list[str]], typer.Option(help="METHOD=LR learning-rate override (repeatable).")] = None,
    set_for: Annotated[Optional[list[str]], typer.Option(help="METHOD.KEY=VALUE method option (repeatable).")] = None,
    columns: Annotated[Optional[str], typer.Option(help="Column mapping, e.g. prompt=question,response=answer.")] = None,
    chat_template: Annotated[Optional[str], typer.Option(help="Chat template: a Jinja file, or chatml / alpaca.")] = None,
    eval_batches: Annotated[Optional[int], typer.Option(min=1, help="Validation batches per figure.")] = None,
    reference_data: Annotated[Optional[str], typer.Option(help="Forgetting set: general prose (causal-lm; default: BBC articles) or a labelled task (classification; default: default:topics).")] = None,
    gpu_memory: Annotated[Optional[str], typer.Option(help="Memory budget for the recommendation, e.g. 24GB.")] = None,
    tasks: Annotated[Optional[int], typer.Option(min=1, help="How many tasks you will serve (K).")] = None,
    priority: Annotated[Optional[str], typer.Option(help="quality, memory, speed or forgetting.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda.")] = None,
    devices: Annotated[Optional[str], typer.Option(help="Spread the runs over these devices, one worker each at "
                                                        "a time, e.g. cuda:0,cuda:1 (default: --device).")] = None,
    output: Annotated[Optional[str], typer.Option(help="Output dir for results.json, report.md/.html, plots.")] = None,
    nproc: Annotated[Optional[int], typer.Option(min=1, help="Train each strategy on N processes (torchrun).")] = None,
    master_weights: Annotated[Optional[bool], typer.Option(
        "--master-weights/--no-master-weights",
        help="Runs update weights that train in bf16/fp16 (full) through fp32 copies (default: on).")] = None,
    combine: Annotated[Optional[str], typer.Option(help="Also combine the plain-LoRA strategies (linear, svd, ties, "
                                                        "...) and score the result against them (combined.json).")] = None,
) -> None:
    """Train every selected strategy on the same model and data, measure the trade-offs, and recommend one."""
    from tunelab.config import load_yaml
    from tunelab.measure.combined import check_combination, combined_quality
    from tunelab.measure.compare import build_options, run_compare

    values = dict(model=model, data=data, task=task, methods=methods, budget=budget, max_steps=max_steps,
                  epochs=epochs, tokens=tokens, batch_size=batch_size, seq_len=seq_len, seed=seed, seeds=seeds,
                  tune_lr=tune_lr, lr_grid=lr_grid, tune_fraction=tune_fraction, lr_for=lr_for,
                  options_for=set_for, columns=columns, chat_template=chat_template, eval_batches=eval_batches,
                  reference_data=reference_data, gpu_memory=gpu_memory, tasks=tasks, priority=priority,
                  device=device, devices=devices, output=output, nproc=nproc, master_weights=master_weights)
    opts = build_options(values, load_yaml(config) if config else None, where=str(config) if config else "compare")
    if combine is not None:
        check_combination(combine)  # before anything trains
    leaves(f"{opts.output} holds no report; rerun with the same --output to reuse the strategies that finished")
    results = run_compare(opts)
    if combine is not None:
        finished = [s.name for s in results.strategies if s.status == "ok"]
        record = combined_quality(opts.output, finished, combine, model=opts.model, data=opts.data,
                                  seq_len=opts.seq_len, batch_size=opts.batch_size,
                                  max_examples=opts.eval_batches and opts.eval_batches * opts.batch_size)
        typer.echo(f"combined ({combine}): {json.dumps(record)}")


def plan(
    model: Annotated[str, typer.Option(help="Local HF model dir, alias, or a config.json (no weights needed).")],
    batch_size: Annotated[int, typer.Option(min=1, help="Micro-batch size.")] = 8,
    seq_len: Annotated[int, typer.Option(min=1, help="Tokens per sequence.")] = 256,
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU), float32, bfloat16, float16.")] = "auto",
    device: Annotated[str, typer.Option(help="cuda or cpu: where training would run.")] = "cuda",
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations.")] = False,
    gpu_memory: Annotated[Optional[str], typer.Option(help="Memory budget, e.g. 80GB: what fits, largest batch.")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated strategies (default: all).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Method option key=value for every planned "
                                                                    "method that has the key, e.g. r=16.")] = None,
    set_for: Annotated[Optional[list[str]], typer.Option(help="METHOD.KEY=VALUE option of one method "
                                                              "(repeatable; wins over --set).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    nproc: Annotated[int, typer.Option(min=1, help="GPUs of the run: predict the peak of each GPU.")] = 1,
    offload_activations: Annotated[bool, typer.Option("--offload-activations", help="With --gradient-checkpointing "
                                                      "on cuda: block inputs wait in host memory.")] = False,
    master_weights: Annotated[bool, typer.Option("--master-weights/--no-master-weights", help="As train "
                                                 "--master-weights: fp32 copies of the weights that train in "
                                                 "bf16/fp16.")] = True,
    strategy: Annotated[str, typer.Option(help="With --nproc: auto (as train decides; give --gpu-memory), fsdp "
                                               "or ddp.")] = "auto",
    reshard_after_forward: Annotated[str, typer.Option(help="With --nproc under FSDP2: auto (as train decides; "
                                                            "give --gpu-memory), always or never.")] = "auto",
) -> None:
    """Predict the peak training memory of each strategy (weights, grads, AdamW, activations, logits) and artifact size."""
    from rich.console import Console

    from tunelab.config import parse_set
    from tunelab.measure.compare import parse_options_for
    from tunelab.measure.plan import plan as make_plan, render_plan

    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    result = make_plan(model, batch_size=batch_size, seq_len=seq_len, dtype=dtype, device=device,
                       gradient_checkpointing=gradient_checkpointing, method_options=parse_set(set_) or None,
                       options_for=parse_options_for(set_for) or None, gpu_memory=gpu_memory, methods=chosen,
                       nproc=nproc, offload_activations=offload_activations, master_weights=master_weights,
                       strategy=strategy, reshard_after_forward=reshard_after_forward)
    if json_:
        typer.echo(result.model_dump_json(indent=1))
    else:
        Console(width=200).print(render_plan(result))
