"""What `tunelab compare` shows: the live progress display, the trade-off table (terminal, Markdown, HTML), and
the report files. `report.html` is self-contained: its plots are embedded as base64 PNG data URIs.
"""

from __future__ import annotations

import base64
import contextlib
import html
from pathlib import Path

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from tunelab.measure.plots import make_plots
from tunelab.measure.portability import human_bytes
from tunelab.measure.schema import TASK_COUNTS, CompareResults, StrategyResult

# --- live progress -------------------------------------------------------------------------------------


class CompareProgress:
    """One rich progress bar per strategy: its step out of the budget, the latest loss, elapsed time and ETA."""

    def __init__(self, console, n_strategies: int):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console, speed_estimate_period=600)
        self.n_strategies, self.started = n_strategies, 0

    def __enter__(self) -> "CompareProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def status(self, text: str) -> None:
        """A one-line note above the bars."""
        self.progress.console.print(text)

    @contextlib.contextmanager
    def strategy(self, name: str, total_steps: int):
        """A bar for strategy `name`; yields a `StrategyBar` to feed with metrics records."""
        self.started += 1
        task = self.progress.add_task(f"[{self.started}/{self.n_strategies}] {name:<8}", total=total_steps,
                                      loss="starting")
        yield StrategyBar(self.progress, task)


class StrategyBar:
    """Moves one strategy's bar from the records of its growing metrics.jsonl."""

    def __init__(self, progress, task):
        self.progress, self.task, self.text = progress, task, "starting"

    def update(self, records: list[dict]) -> None:
        for r in records:
            if r.get("loss") is not None and "step" in r:
                self.text = f"loss {r['loss']:.4f}"
                self.progress.update(self.task, completed=r["step"], loss=self.text)
            elif r.get("val_loss") is not None:
                self.progress.update(self.task, loss=f"{self.text} val {r['val_loss']:.4f}")

    def finish(self, ok: bool, error: str | None = None) -> None:
        text = f"{self.text}, done" if ok else f"failed: {(error or '')[:60]}"
        self.progress.update(self.task, loss=text, **({"completed": self.progress.tasks[self.task].total}
                                                         if ok else {}))
        self.progress.stop_task(self.task)  # freezes its elapsed time, failed or not


# --- the trade-off table -------------------------------------------------------------------------------

def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _params(s: StrategyResult) -> str:
    if s.params_trainable is None:
        return "-"
    pct = f" ({s.trainable_percent:.3g}%)" if s.trainable_percent is not None else ""
    return f"{s.params_trainable:,}{pct}"


def _forgetting(s: StrategyResult) -> str:
    f = s.forgetting
    return "-" if f is None else f"{f.delta:+.3g} ({f.delta_percent:+.1f}%)"


def _serve(s: StrategyResult) -> str:
    p = s.portability
    return "-" if p is None else " / ".join(human_bytes(p.serve_bytes.get(k)) for k in TASK_COUNTS)


def trade_off_table(results: CompareResults) -> tuple[list[str], list[list[str]]]:
    """The headers and rows (strings) of the trade-off table, shared by the terminal, Markdown and HTML."""
    classification = any(s.val_accuracy is not None for s in results.strategies)
    predicted = any(s.predicted_memory_bytes is not None for s in results.strategies)
    headers = ["strategy", "status", "params updated", "peak memory", *(["plan predicts"] * predicted),
               "artifact", "tokens/s", "train time", "val loss",
               "val accuracy" if classification else "val perplexity", "forgetting (prose ppl)",
               "serve " + "/".join(str(k) for k in TASK_COUNTS) + " tasks", "attach / load"]
    rows = []
    for s in results.strategies:
        quality = _num(s.val_accuracy, ".3f") if classification else _num(s.val_perplexity, ".4g")
        attach = s.portability.attach_seconds if s.portability else None
        rows.append([s.name, s.status, _params(s), human_bytes(s.peak_memory_bytes),
                     *([human_bytes(s.predicted_memory_bytes)] * predicted), human_bytes(s.artifact_bytes),
                     _num(s.tokens_per_second, ".0f"), _seconds(s.wall_seconds), _num(s.val_loss, ".4f"),
                     quality, _forgetting(s), _serve(s), _seconds(attach)])
    return headers, rows


def _seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g} s"


def recommendation_lines(results: CompareResults) -> list[str]:
    """The recommendation as short lines of text (the pick, its reasons, what was left out and why)."""
    rec = results.recommendation
    if rec is None:
        return ["no recommendation was made"]
    budget = f", memory budget {human_bytes(rec.gpu_memory)}" if rec.gpu_memory else ""
    head = (f"Recommended: {rec.strategy} (priority {rec.priority}, {rec.tasks} task(s){budget})"
            if rec.strategy else f"No strategy recommended (priority {rec.priority}{budget})")
    lines = [head] + [f"- {r}" for r in rec.reasons]
    lines += [f"- left out {name}: {why}" for name, why in rec.excluded.items()]
    return lines


def memory_source_note(results: CompareResults) -> str:
    """Which peak-memory figure the table shows (GPU allocator peak, or OS peak RSS minus idle RSS)."""
    sources = sorted({s.peak_memory_source for s in results.strategies if s.peak_memory_source})
    return f"Peak memory source: {', '.join(sources) or 'not measured'}."


def print_table(results: CompareResults, console) -> None:
    """Print the trade-off table and the recommendation on a rich console."""
    headers, rows = trade_off_table(results)
    table = Table(title="tunelab compare: trade-offs", show_lines=False)
    for h in headers:
        table.add_column(h, justify="left" if h in ("strategy", "status") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(memory_source_note(results))
    for line in recommendation_lines(results):
        console.print(line, markup=False, highlight=False)


# --- report files --------------------------------------------------------------------------------------

def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])


def _details(results: CompareResults) -> list[tuple[str, str]]:
    """(label, text) pairs of run metadata, failures and notes, for both report formats."""
    hw, cfg = results.hardware, results.config
    gpu = f"{hw.gpu_name} ({human_bytes(hw.gpu_memory_bytes)})" if hw.gpu_name else "none"
    out = [("Hardware", f"{hw.cpu_model}, {hw.cpu_cores} cores, RAM {human_bytes(hw.ram_bytes)}, GPU {gpu}"),
           ("Versions", ", ".join(f"{k} {v}" for k, v in results.versions.items())),
           ("Budget", f"model {cfg.model}, data {cfg.data}, {cfg.max_steps} steps, batch {cfg.batch_size}, "
                      f"seq_len {cfg.seq_len}, seed {cfg.seed}"),
           ("Forgetting", f"perplexity on the first {results.baseline.reference_sequences} sequences of "
                          f"{cfg.reference_data} ({results.baseline.reference_tokens} tokens), base model "
                          f"{_num(results.baseline.reference_perplexity, '.4g')}")]
    for s in results.strategies:
        if s.error:
            out.append((f"{s.name} failed", s.error))
        out += [(f"{s.name} note", n) for n in s.notes]
    return out


def write_markdown(results: CompareResults, path: Path, plots: dict[str, Path]) -> Path:
    """Write `report.md`: the recommendation, the table, links to the plots, and the run's metadata."""
    headers, rows = trade_off_table(results)
    parts = ["# tunelab compare", "", *recommendation_lines(results), "", _md_table(headers, rows), "",
             memory_source_note(results), ""]
    parts += [f"![{name}]({p.relative_to(path.parent).as_posix()})" for name, p in plots.items()]
    parts += ["", "## Run", ""] + [f"- **{label}**: {text}" for label, text in _details(results)]
    path.write_text("\n".join(parts) + "\n")
    return path


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child"
        "{text-align:left}img{max-width:48%;margin:4px;border:1px solid #eee}")


def write_html(results: CompareResults, path: Path, plots: dict[str, Path]) -> Path:
    """Write a self-contained `report.html`: plots embedded as base64 PNG data URIs, no external files."""
    esc = html.escape
    headers, rows = trade_off_table(results)
    rec = recommendation_lines(results)
    table = ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")
    images = "".join(
        f'<img alt="{esc(name)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for name, p in plots.items())
    body = [f"<h1>tunelab compare</h1><h2>{esc(rec[0])}</h2><ul>",
            *(f"<li>{esc(line[2:])}</li>" for line in rec[1:]), "</ul>", table,
            f"<p>{esc(memory_source_note(results))}</p>", images, "<h2>Run</h2><ul>",
            *(f"<li><b>{esc(label)}</b>: {esc(text)}</li>" for label, text in _details(results)), "</ul>"]
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>tunelab compare</title>"
                    f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")
    return path


def write_reports(results: CompareResults, out_dir: Path) -> tuple[Path, Path]:
    """Draw the plots into `out_dir/plots/` and write `report.md` and `report.html`; returns their paths."""
    out_dir = Path(out_dir)
    plots = make_plots(results, out_dir / "plots")
    return write_markdown(results, out_dir / "report.md", plots), write_html(results, out_dir / "report.html", plots)
