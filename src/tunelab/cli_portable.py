"""The portability commands of the CLI: `combine` (several LoRA adapters into one) and `export` (GGUF for
llama.cpp). Typed functions registered on the app by `cli.py`; their docstrings are their `--help`.
Imports of tunelab's layers sit inside the commands, as in `cli.py`, so `--help` does not load torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tunelab.errors import ConfigError


def combine(
    adapter: Annotated[list[Path], typer.Option(help="LoRA adapter dir to combine (repeat, in order).")],
    output: Annotated[Path, typer.Option(help="Output adapter dir (new or empty).")],
    method: Annotated[str, typer.Option(help="linear, cat, svd, ties, dare (= dare_linear), dare_ties, "
                                             "magnitude_prune, or ties_svd / dare_linear_svd / dare_ties_svd / "
                                             "magnitude_prune_svd.")] = "linear",
    weights: Annotated[Optional[str], typer.Option(help="Comma-separated weight per adapter (default 1 each).")] = None,
    rank: Annotated[Optional[int], typer.Option(help="Target rank of the svd family (default: largest input).")] = None,
    density: Annotated[Optional[float], typer.Option(help="Share of entries kept by ties, dare, magnitude_prune.")] = None,
    majority_sign: Annotated[str, typer.Option(help="TIES sign election: total or frequency.")] = "total",
    svd_clamp: Annotated[Optional[float], typer.Option(help="Clamp svd factors to this quantile, in (0, 1).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of DARE's random drop.")] = 0,
) -> None:
    """Combine LoRA adapters of one base into one PEFT-format LoRA adapter (PEFT's add_weighted_adapter)."""
    from tunelab.artifacts.combine import combine as run_combine
    from tunelab.cli import _check_merge_output
    from tunelab.interrupts import leaves

    _check_merge_output(output)
    leaves(f"nothing was written to {output}")
    written = run_combine(adapter, output, method, weights=parse_floats(weights, "--weights"), rank=rank,
                          density=density, majority_sign=majority_sign, svd_clamp=svd_clamp, seed=seed)
    typer.echo(f"combined adapter written to {output} ({written} bytes)")


def parse_floats(text: str | None, option: str) -> list[float] | None:
    """'0.7,0.3' -> [0.7, 0.3]; None stays None; anything else is a one-line error naming the option."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected comma-separated numbers, e.g. 0.7,0.3") from None


def export(
    model: Annotated[str, typer.Option(help="Base (or fully fine-tuned) Llama model dir, or alias.")],
    output: Annotated[Path, typer.Option(help="Output file, e.g. model.gguf (must not exist).")],
    format_: Annotated[str, typer.Option("--format", help="Output format: gguf (llama.cpp, Ollama).")],
    adapter: Annotated[Optional[Path], typer.Option(help="Adapter dir: merged into the model, or with --lora "
                                                         "written as a GGUF LoRA adapter.")] = None,
    lora: Annotated[bool, typer.Option("--lora", help="Write --adapter (LoRA) as a GGUF LoRA adapter for "
                                                      "llama.cpp's --lora instead of merging it.")] = False,
    outtype: Annotated[str, typer.Option(help="Tensor type: f32, f16, bf16 or q8_0.")] = "f16",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow model code from the model dir.")] = False,
) -> None:
    """Export a Llama model (an adapter merged in, or not) or a LoRA adapter as a GGUF file for llama.cpp."""
    from tunelab.artifacts import inspect
    from tunelab.artifacts.export import check_request, export_lora, export_model
    from tunelab.cli import _refuse_unmergeable
    from tunelab.interrupts import leaves

    check_request(output, format_, outtype)
    if lora and adapter is None:
        raise ConfigError("--lora: expected --adapter DIR, the LoRA adapter to write")
    leaves(f"nothing was written to {output}")
    if lora:
        written = export_lora(model, adapter, output, outtype)
    else:
        if adapter is not None:
            _refuse_unmergeable(inspect(adapter))
        written = export_model(model, output, outtype, adapter=adapter, trust_remote_code=trust_remote_code)
    typer.echo(f"{'LoRA adapter' if lora else 'model'} written to {output} ({written} bytes, {outtype})")
