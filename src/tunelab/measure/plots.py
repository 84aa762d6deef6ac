"""The plots of a compare report, drawn with matplotlib's Agg canvas (no display, no global pyplot state).

Each plot is drawn only when at least one strategy has the figures it needs; `make_plots` returns the ones drawn.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tunelab.measure.portability import serve_bytes
from tunelab.measure.schema import Baseline, CompareResults, StrategyResult

MB, GB = 1e6, 1e9


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


def _base_line(ax, value: float | None, label: str) -> None:
    """The untouched base model's figure as a dashed grey horizontal line."""
    if value is not None:
        ax.axhline(value, color="grey", linestyle="--", linewidth=1, label=label)


def loss_curves(strategies: list[StrategyResult], path: Path, base: Baseline | None = None) -> Path | None:
    """Training loss per step for every strategy (first seed); validation losses as markers of the same colour;
    the base model's validation loss as a dashed line."""
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
    _base_line(ax, base.val_loss if base else None, "base (no tuning), val")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    return _save(fig, path)


def _scatter(points: list[tuple[str, float, float]], path: Path, title: str, xlabel: str, ylabel: str,
             logx: bool = False, base_y: float | None = None) -> Path | None:
    if not points:
        return None
    fig, ax = _axes(title, xlabel, ylabel)
    for name, x, y in points:
        ax.scatter([x], [y])
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
    _base_line(ax, base_y, "base (no tuning)")
    if base_y is not None:
        ax.legend(fontsize="small")
    if logx:
        ax.set_xscale("log")
    return _save(fig, path)


def quality_vs_memory(strategies: list[StrategyResult], path: Path, base: Baseline | None = None) -> Path | None:
    """Validation loss (lower is better) against memory: the tensor peak where measured, else the peak."""
    def memory(s):
        return s.tensor_peak_bytes if s.tensor_peak_bytes is not None else s.peak_memory_bytes

    pts = [(s.name, memory(s) / MB, s.val_loss) for s in strategies if memory(s) is not None and s.val_loss is not None]
    label = "tensor peak (MB)" if any(s.tensor_peak_bytes for s in strategies) else "peak memory (MB)"
    return _scatter(pts, path, "Quality against memory", label, "validation loss (lower is better)",
                    base_y=base.val_loss if base else None)


def quality_vs_forgetting(strategies: list[StrategyResult], path: Path, base: Baseline | None = None) -> Path | None:
    """Validation loss against forgetting (right = more forgotten): the change in perplexity on general prose,
    or for classification the drop in the forgetting probe's accuracy."""
    pts = [(s.name, s.forgetting.delta_percent, s.val_loss) for s in strategies
           if s.forgetting is not None and s.val_loss is not None]
    probe = any(s.forgetting and s.forgetting.measure == "probe_accuracy" for s in strategies)
    xlabel = ("probe accuracy drop (%, right = forgot more)" if probe
              else "prose perplexity change (%, right = forgot more)")
    return _scatter(pts, path, "Quality against forgetting", xlabel, "validation loss (lower is better)",
                    base_y=base.val_loss if base else None)


def lr_searches(strategies: list[StrategyResult], path: Path, base: Baseline | None = None) -> Path | None:
    """Each strategy's lr search: validation loss against learning rate (log scale), the chosen lr circled."""
    searched = [s for s in strategies if s.lr_search and any(v is not None for _, v in s.lr_search.curve)]
    if not searched:
        return None
    fig, ax = _axes("Learning-rate search (short runs)", "learning rate (log scale)", "validation loss")
    for s in searched:
        pts = [(lr, v) for lr, v in s.lr_search.curve if v is not None]
        (line,) = ax.plot(*zip(*pts), marker=".", label=s.name)
        chosen = [v for lr, v in pts if lr == s.lr_search.chosen_lr]
        if chosen:
            ax.plot([s.lr_search.chosen_lr], chosen, "o", mfc="none", ms=10, color=line.get_color())
    _base_line(ax, base.val_loss if base else None, "base (no tuning)")
    ax.set_xscale("log")
    ax.legend(fontsize="small")
    return _save(fig, path)


def artifact_sizes(strategies: list[StrategyResult], path: Path, base: Baseline | None = None) -> Path | None:
    """MB on disk of each strategy's artifact, on a log scale."""
    sized = [s for s in strategies if s.artifact_bytes]
    if not sized:
        return None
    fig, ax = _axes("Artifact size (log scale)", "MB on disk", "")
    ax.barh([s.name for s in sized], [s.artifact_bytes / MB for s in sized])
    ax.set_xscale("log")
    return _save(fig, path)


def portability_curve(strategies: list[StrategyResult], path: Path, base: Baseline | None = None,
                      max_tasks: int = 100) -> Path | None:
    """Bytes to serve K tasks, K = 1..max_tasks: K whole models against one base plus K adapters (log-log)."""
    with_p = [s for s in strategies if s.portability is not None]
    if not with_p:
        return None
    fig, ax = _axes("Serving K tasks", "K (tasks)", "GB on disk")
    ks = list(range(1, max_tasks + 1))
    for s in with_p:
        p = s.portability
        ax.plot(ks, [serve_bytes(p.artifact, p.bytes_per_task, p.base_bytes, k) / GB for k in ks], label=s.name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    return _save(fig, path)


PLOTS = {"loss_curves": loss_curves, "quality_vs_memory": quality_vs_memory,
         "quality_vs_forgetting": quality_vs_forgetting, "artifact_size": artifact_sizes,
         "portability": portability_curve, "lr_search": lr_searches}


def make_plots(results: CompareResults, out_dir: Path) -> dict[str, Path]:
    """Draw every plot that has data into `out_dir` as `<name>.png`; returns {name: path} of those drawn.

    The dir is written whole or not at all (`atomic_dir`): a full disk leaves no half-drawn plot behind.
    """
    from tunelab.artifacts.atomic import atomic_dir

    out_dir = Path(out_dir)
    drawn = {}
    with atomic_dir(out_dir) as tmp:
        for name, draw in PLOTS.items():
            if draw(results.strategies, tmp / f"{name}.png", results.baseline) is not None:
                drawn[name] = out_dir / f"{name}.png"
    return drawn
