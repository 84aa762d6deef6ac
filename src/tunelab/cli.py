"""The `tunelab` command line. Each subcommand is a typed function; its docstring is its `--help`.

Bad input exits 2 with one line on stderr that names the file, row, field or key (no traceback unless
`--debug`). A run stopped by SIGTERM saves a checkpoint and exits 0; any other interruption exits 130 (SIGINT)
or 143 (SIGTERM) with one line saying what was left where.

Imports of tunelab's layers sit inside the commands, on purpose and only here (and in the one-time model
conversion of `defaults`): `tunelab --help` and a usage error must answer without loading torch,
transformers and the training stack that `train` or `serve` need. Every other module imports at its top.
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tunelab.cli_measure import Data, Model
from tunelab.errors import ConfigError, TunelabError, closest
from tunelab.interrupts import Interrupted, leaves, message, raising_signals

_ARGV: list[str] = []  # the command line `main` ran (what `train --nproc` passes on to torchrun)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Adapt pre-trained transformers with any fine-tuning strategy, "
                  "and measure the trade-offs on your own model, data and hardware.")



@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    """`--debug` is read by `main` from the raw arguments (anywhere on the line); declared here for `--help`."""


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML run config; flags override it.")] = None,
    model: Model = None,
    data: Data = None,
    task: Annotated[Optional[str], typer.Option(help="causal-lm or classification.")] = None,
    method: Annotated[Optional[str], typer.Option(help="Fine-tuning method (see `tunelab methods`).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Method option key=value (repeatable).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after N optimizer steps.")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Epochs over the training split.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Micro-batch size.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default: the method's).")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Maximum tokens per example.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    output: Annotated[Optional[str], typer.Option(help="Output dir (run.json, metrics.jsonl, artifact/).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="With --resume: continue even if result-affecting "
                                                            "config changed.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in an output dir that holds an "
                                                                "earlier run (finished, or with checkpoints), "
                                                                "replacing it.")] = False,
    save_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps.")] = None,
    keep_last: Annotated[Optional[int], typer.Option(help="Keep only the newest N checkpoints.")] = None,
    nan_policy: Annotated[Optional[str], typer.Option(help="stop (default) or skip.")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(
        help="With --gradient-checkpointing: recompute every N-th block only (faster, more memory).")] = None,
    offload_activations: Annotated[Optional[bool], typer.Option(
        "--offload-activations/--no-offload-activations",
        help="With --gradient-checkpointing on CUDA: keep checkpointed block inputs in host memory.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto, float32, bfloat16, float16.")] = None,
    master_weights: Annotated[Optional[bool], typer.Option(
        "--master-weights/--no-master-weights",
        help="Update weights that train in bf16/fp16 (full fine-tuning) through fp32 copies (default: on; "
             "off: bf16 AdamW, half the optimizer memory, small updates round away).")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the model dir.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    columns: Annotated[Optional[str], typer.Option(help="Column mapping, e.g. prompt=question,response=answer.")] = None,
    chat_template: Annotated[Optional[str], typer.Option(help="Chat template: a Jinja file, or chatml / alpaca.")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear warmup steps.")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="cosine (default), linear or constant.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay.")] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Share of rows held out for validation.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Validate every N steps (and at the end).")] = None,
    eval_batches: Annotated[Optional[int], typer.Option(help="Validate on at most N batches.")] = None,
    packing: Annotated[Optional[bool], typer.Option("--packing/--no-packing",
                                                    help="Concatenate examples into seq-len chunks.")] = None,
    packing_mask: Annotated[Optional[str], typer.Option(
        help="With --packing: document (attention stays inside each document; the default where the method "
             "allows it) or none.")] = None,
    nproc: Annotated[Optional[int], typer.Option(min=1, help="Train on N processes of this machine (one per GPU) "
                                                         "through torchrun.")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="Under torchrun: auto, fsdp (FSDP2) or ddp.")] = None,
    reshard_after_forward: Annotated[Optional[str], typer.Option(
        help="FSDP2: auto, always or never free each block's gathered weights after its forward (auto keeps them "
             "when the model in bf16 takes at most 15% of the GPU).")] = None,
    report_to: Annotated[Optional[str], typer.Option(help="Trackers beside metrics.jsonl: tensorboard, wandb "
                                                          "(comma-separated), all or none.")] = None,
    add_tokens: Annotated[Optional[list[str]], typer.Option(help="New special tokens, comma-separated or a file "
                                                                 "(one a line); their rows train (repeatable).")] = None,
) -> None:
    """Fine-tune a model with one method; writes run.json, metrics.jsonl, checkpoints/ and artifact/."""
    from tunelab.config import build_config, load_yaml, parse_columns, parse_set, parse_tokens

    if nproc is not None:
        from tunelab.launch import run_torchrun

        raise typer.Exit(run_torchrun(nproc, _ARGV))

    file_values = load_yaml(config) if config else {}
    options = parse_set(set_)  # merged over the file's method_options by build_config
    overrides = dict(model=model, data=data, task=task, method=method, max_steps=max_steps, epochs=epochs,
                     batch_size=batch_size, grad_accum=grad_accum, lr=lr, seq_len=seq_len, seed=seed,
                     output=output, save_every=save_every, keep_last=keep_last, nan_policy=nan_policy,
                     gradient_checkpointing=gradient_checkpointing, device=device, dtype=dtype,
                     master_weights=master_weights, method_options=options or None, resume=resume or None, force=force or None,
                     overwrite=overwrite or None, trust_remote_code=trust_remote_code or None,
                     columns=parse_columns(columns), chat_template=chat_template, warmup_steps=warmup_steps,
                     schedule=schedule, weight_decay=weight_decay, val_fraction=val_fraction, eval_every=eval_every,
                     eval_batches=eval_batches, packing=packing, packing_mask=packing_mask,
                     checkpoint_every=checkpoint_every, offload_activations=offload_activations,
                     strategy=strategy, reshard_after_forward=reshard_after_forward, report_to=report_to,
                     add_tokens=parse_tokens(add_tokens))
    cfg = build_config(file_values, overrides, where=str(config) if config else "train")
    _check_output_path(Path(cfg.output))
    leaves(f"{cfg.output} holds no finished run; its checkpoints, if any, are intact (continue with --resume)")
    from tunelab.train import train as run_training

    from tunelab.train.distributed import shutdown

    summary = run_training(cfg, progress=not quiet)
    shutdown()  # under torchrun: leave the process group once the run is done
    _print_summary(summary, cfg.output)


def _print_summary(summary: dict, output: str) -> None:
    if "rank" in summary:  # a rank other than 0 under torchrun: rank 0 reports
        return
    if summary.get("status") == "interrupted":  # SIGTERM: checkpoint saved, exit 0
        typer.echo(summary.get("message", "interrupted; resume with --resume"), err=True)
        return
    keys = ["method", "params_trainable", "trainable_percent", "peak_memory_bytes", "tokens_per_second",
            "wall_seconds", "artifact_bytes", "final_train_loss", "final_val_loss"]
    shown = {k: summary.get(k) for k in keys if k in summary}
    typer.echo(json.dumps(shown, default=str))
    typer.echo(f"run written to {output}/ (run.json, metrics.jsonl, artifact/)", err=True)


@app.command(name="eval")
def eval_(
    model: Annotated[str, typer.Option(help="Local HF model dir or alias.")],
    data: Annotated[str, typer.Option(help="JSONL/CSV/Parquet file, or 'default' (its validation split).")],
    adapter: Annotated[Optional[Path], typer.Option(help="Adapter dir to apply (PEFT layout).")] = None,
    task: Annotated[str, typer.Option(help="causal-lm or classification.")] = "causal-lm",
    seq_len: Annotated[int, typer.Option(min=1, help="Maximum tokens per example.")] = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size.")] = 8,
    max_examples: Annotated[Optional[int], typer.Option(min=1, help="Evaluate only the first N examples.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the model dir.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Report loss and perplexity (or accuracy) of a base model, with or without an adapter."""
    from tunelab.evaluation import evaluate_spec

    result = evaluate_spec(model, data, adapter=adapter, task=task, seq_len=seq_len, batch_size=batch_size,
                           max_examples=max_examples, trust_remote_code=trust_remote_code, progress=not quiet)
    if json_:
        typer.echo(json.dumps(result))
    else:
        _print_eval_table(result)


def _print_eval_table(result: dict) -> None:
    """What was scored (model, adapter, data and split), then the scores."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="evaluation")
    table.add_column("", style="bold")
    table.add_column("value", no_wrap=True)
    scored = {"model": result["model"], "adapter": result["adapter"] or "none (base model)",
              "data": f"{result['data']} ({result['examples']} examples"
                      f"{', its validation split' if result['split'] == 'validation' else ''})"}
    scores = {k: v for k, v in result.items() if k not in (*scored, "split", "examples")}
    for key, value in {**scored, **scores}.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console = Console()
    widest = max(len(str(v)) for v in scored.values()) + 20  # paths stay whole (copyable), never cut or folded
    Console(width=max(console.width, widest)).print(table)


@app.command()
def merge(
    model: Annotated[str, typer.Option(help="Base model dir or alias.")],
    adapter: Annotated[Path, typer.Option(help="Adapter dir to fold into the base.")],
    output: Annotated[Path, typer.Option(help="Output HF model dir.")],
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the model dir.")] = False,
) -> None:
    """Fold an adapter into the base weights and write a plain HF model dir."""
    from tunelab.artifacts import inspect, load_adapter, save_merged
    from tunelab.artifacts.peft_format import tokenizer_for
    from tunelab.models import load_model

    _check_merge_output(output)
    leaves(f"nothing was written to {output}")
    info = inspect(adapter)
    _refuse_unmergeable(info)
    loaded = load_model(model, task=info.task, dtype="float32", device="cpu",
                        trust_remote_code=trust_remote_code, label_names=info.label_names)
    name = load_adapter(loaded.model, adapter)
    written = save_merged(loaded.model, tokenizer_for(loaded.tokenizer, [adapter]), name, output)
    typer.echo(f"merged model written to {output} ({written} bytes)")


def _check_output_path(output: Path) -> None:
    """`--output` must be a directory or creatable as one: no file in its place or in place of a parent."""
    for path in (output, *output.parents):
        if path.exists():
            if not path.is_dir():
                what = "exists and is a file" if path == output else f"its parent {path} is a file"
                raise ConfigError(f"--output {output}: {what}; expected a directory path")
            return


def _check_merge_output(output: Path) -> None:
    """`--output` must be new or an empty dir: a merge never replaces files it did not write."""
    _check_output_path(output)
    if output.is_dir() and any(output.iterdir()):
        shown = ", ".join(sorted(p.name for p in output.iterdir())[:3])
        raise ConfigError(f"--output {output}: exists and is not empty ({shown}, ...); expected a new or empty "
                          f"directory for the merged model (remove it or choose another)")


def _refuse_unmergeable(info) -> None:
    """Refuse, before the base model loads, a whole-model dir or an adapter whose method cannot be merged."""
    from tunelab.methods import all_methods, get_method

    if info.kind == "model":
        raise ConfigError(f"--adapter {info.path}: a whole model dir, not an adapter; there is nothing to merge, "
                          f"use it as --model directly")
    method = get_method(info.method)
    if not method.mergeable:
        mergeable = ", ".join(m.name for m in all_methods().values() if m.mergeable)
        raise ConfigError(f"--adapter {info.path}: method '{method.name}' trains {method.trains}, not base weights, "
                          f"so it cannot be merged; mergeable methods: {mergeable} (serve it as an adapter instead)")


@app.command()
def methods() -> None:
    """List every fine-tuning method: family, what trains, mergeable, HF PEFT loadable."""
    from rich.console import Console
    from rich.table import Table

    from tunelab.methods import all_methods

    table = Table(title="tunelab methods")
    for col in ("method", "family", "what trains", "mergeable", "HF PEFT loads it", "paper"):
        table.add_column(col)
    for m in all_methods().values():
        table.add_row(m.name, m.family, m.trains, "yes" if m.mergeable else "no",
                      "yes" if m.peft_loadable else "no", m.paper)
    Console(width=200).print(table)


from tunelab import cli_measure  # noqa: E402  (the measuring commands; their layers import inside them)

app.command()(cli_measure.compare)
app.command()(cli_measure.plan)


from tunelab import cli_serve  # noqa: E402  (the serving commands; their layers import inside them)

app.command()(cli_serve.serve)
app.command()(cli_serve.generate)
app.command()(cli_serve.chat)


from tunelab import cli_portable  # noqa: E402  (typer only: `combine` and `export` join the app here)

app.command()(cli_portable.combine)
app.command()(cli_portable.export)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the CLI and map errors to exit codes (2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _ARGV[:] = argv
    debug = "--debug" in argv
    if debug:  # accepted anywhere on the line, not only before the subcommand
        argv = ["--debug"] + [a for a in argv if a != "--debug"]
    leaves("nothing was written")
    try:
        with raising_signals():
            code = app(args=argv, prog_name="tunelab", standalone_mode=False)
        return code if isinstance(code, int) else 0  # the CLI library returns an interrupted command's code
    except Interrupted as e:
        print(f"error: {message(e)}", file=sys.stderr)
        return e.exit_code
    except TunelabError as e:
        if debug:
            raise
        if not getattr(e, "quiet", False):  # a rank stopped by another rank's failure: that rank says why
            print(f"error: {_rank_prefix()}{e}", file=sys.stderr)
        return e.exit_code
    except (typer.Exit, typer.Abort) as e:
        return getattr(e, "exit_code", 130)
    except OSError as e:  # a path the system refused (permissions, read-only or full disk) that no check named
        if debug or e.filename is None:
            raise
        if e.errno == errno.ENOSPC:
            print(f"error: disk full while writing {e.filename}", file=sys.stderr)
            return 2
        print(f"error: {e.filename}: {e.strerror or e}; expected a path tunelab can read and write", file=sys.stderr)
        return 2
    except Exception as e:
        if not hasattr(e, "format_message") or debug:  # not a CLI usage error (click's, vendored or not)
            raise
        return _usage_error(e)


def _rank_prefix() -> str:
    """'rank R: ' in a process started by torchrun (its environment says so), else ''."""
    import os

    return f"rank {os.environ['RANK']}: " if "RANK" in os.environ and "LOCAL_RANK" in os.environ else ""


def _usage_error(e: Exception) -> int:
    """Print a CLI usage error as one line; an unknown option gets the closest valid one."""
    option = getattr(e, "option_name", None)
    if option and hasattr(e, "possibilities"):
        hint = closest(option, _options_of(e) or e.possibilities or [])
        ctx = getattr(e, "ctx", None)
        if not hint and ctx is not None:
            hint = f" for '{ctx.command_path}' (its options: {ctx.command_path} --help)"
        print(f"error: unknown option {option}{hint}", file=sys.stderr)
    else:
        print(f"error: {e.format_message().splitlines()[0]}", file=sys.stderr)
    return 2

def _options_of(e: Exception) -> list[str]:
    """Every long option of the command a usage error came from (the CLI library offers only its own guesses)."""
    command = getattr(getattr(e, "ctx", None), "command", None)
    return [o for p in getattr(command, "params", ()) for o in getattr(p, "opts", ()) if o.startswith("--")]


if __name__ == "__main__":
    sys.exit(main())
