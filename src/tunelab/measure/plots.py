"""The plots of a compare report, drawn with matplotlib's Agg canvas (no display, no global pyplot state).

Each plot is drawn only when at least one strategy has the figures it needs; `make_plots` returns the ones drawn.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tunelab.measure.portability import serve_bytes
from tunelab.measure.schema import CompareResults, StrategyResult

MB = 1e6


def _axes(title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def loss_curves(strategies: list[StrategyResult], path: Path) -> Path | None:
    """Training loss per step for every strategy; validation losses as markers of the same colour."""
    with_curves = [s for s in strategies if s.loss_curve]
    if not with_curves:
        return None

    fig, ax = _axes("Loss curves (same batches for every strategy; dots: validation)", "step", "loss")
    for s in with_curves:
        steps, losses = zip(*s.loss_curve)
        (line,) = ax.plot(steps, losses, label=s.name)
        if s.val_curve:
            vs, vl = zip(*s.val_curve)
            ax.plot(vs, vl, "o", color=line.get_color())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    return _save(fig, path)


def _scatter(points: list[tuple[str, float, float]], path: Path, title: str, xlabel: str, ylabel: str,
             logx: bool = False) -> Path | None:
    if not points:
        return None
    fig, ax = _axes(title, xlabel, ylabel)
    for name, x, y in points:
        ax.scatter([x], [y])
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
    if logx:
        ax.set_xscale("log")
    return _save(fig, path)


def quality_vs_memory(strategies: list[StrategyResult], path: Path) -> Path | None:
    """Validation loss (lower is better) against peak memory."""
    pts = [(s.name, s.peak_memory_bytes / MB, s.val_loss) for s in strategies
           if s.peak_memory_bytes is not None and s.val_loss is not None]
    return _scatter(pts, path, "Quality against peak memory", "peak memory (MB)", "validation loss (lower is better)")


def quality_vs_forgetting(strategies: list[StrategyResult], path: Path) -> Path | None:
    """Validation loss against the change in perplexity on general prose (right = more forgotten)."""
    pts = [(s.name, s.forgetting.delta_percent, s.val_loss) for s in strategies
           if s.forgetting is not None and s.val_loss is not None]
    return _scatter(pts, path, "Quality against forgetting", "prose perplexity change (%)",
                    "validation loss (lower is better)")


def artifact_sizes(strategies: list[StrategyResult], path: Path) -> Path | None:
    """Bytes on disk of each strategy's artifact, on a log scale."""
    sized = [s for s in strategies if s.artifact_bytes]
    if not sized:
        return None
    fig, ax = _axes("Artifact size (log scale)", "bytes on disk", "")
    ax.barh([s.name for s in sized], [s.artifact_bytes for s in sized])
    ax.set_xscale("log")
    return _save(fig, path)


def portability_curve(strategies: list[StrategyResult], path: Path, max_tasks: int = 100) -> Path | None:
    """Bytes to serve K tasks, K = 1..max_tasks: K whole models against one base plus K adapters (log-log)."""
    with_p = [s for s in strategies if s.portability is not None]
    if not with_p:
        return None
    fig, ax = _axes("Serving K tasks", "K (tasks)", "bytes on disk")
    ks = list(range(1, max_tasks + 1))
    for s in with_p:
        p = s.portability
        ax.plot(ks, [serve_bytes(p.artifact, p.bytes_per_task, p.base_bytes, k) for k in ks], label=s.name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    return _save(fig, path)


PLOTS = {"loss_curves": loss_curves, "quality_vs_memory": quality_vs_memory,
         "quality_vs_forgetting": quality_vs_forgetting, "artifact_size": artifact_sizes,
         "portability": portability_curve}


def make_plots(results: CompareResults, out_dir: Path) -> dict[str, Path]:
    """Draw every plot that has data into `out_dir` as `<name>.png`; returns {name: path} of those drawn."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = {}
    for name, draw in PLOTS.items():
        path = draw(results.strategies, out_dir / f"{name}.png")
        if path is not None:
            drawn[name] = path
    return drawn
