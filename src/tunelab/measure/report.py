"""What `tunelab compare` shows: the live progress display, the trade-off table (terminal, Markdown, HTML), and
the report files. `report.html` is self-contained: its plots are embedded as base64 PNG data URIs.
"""

from __future__ import annotations

import base64
import contextlib
import html
import threading
from pathlib import Path

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich import box
from rich.table import Table

from tunelab.jsonio import write_text_atomic
from tunelab.measure.lr_search import MAX_EXTENSIONS
from tunelab.measure.plots import make_plots
from tunelab.measure.portability import human_bytes
from tunelab.measure.schema import TASK_COUNTS, CompareResults, StrategyResult
from tunelab.measure.stats import plus_minus, spread_text

# --- live progress -------------------------------------------------------------------------------------


class CompareProgress:
    """One rich progress bar per strategy: its step out of the budget, the latest loss, elapsed time and ETA."""

    def __init__(self, console, n_strategies: int):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console, speed_estimate_period=600)
        self.n_strategies, self.started = n_strategies, 0
        self._lock = threading.Lock()  # runs on several devices start bars from several threads

    def __enter__(self) -> "CompareProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def status(self, text: str) -> None:
        """A one-line note above the bars."""
        self.progress.console.print(text)

    @contextlib.contextmanager
    def strategy(self, name: str, total_steps: int, unplanned: bool = False):
        """A bar for strategy `name`; yields a `StrategyBar` to feed with metrics records. `unplanned`: a run
        not counted in the total beforehand (an lr search past its grid), which adds one to it."""
        with self._lock:
            self.started += 1
            self.n_strategies += unplanned
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


BASE_ROW = "base (no tuning)"


def _quality_cell(s: StrategyResult, classification: bool) -> str:
    key = "val_accuracy" if classification else "val_perplexity"
    return _with_spread(s, key, getattr(s, key), ".3f" if classification else ".4g")


def _with_spread(s: StrategyResult, key: str, value: float | None, fmt: str) -> str:
    """The mean with its spread over seeds, '2.369 [2.351, 2.387]', or the value alone for one seed."""
    sp = s.spread.get(key)
    return spread_text(sp, fmt) if sp is not None and sp.n >= 2 else _num(value, fmt)


def _seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g} s"


def _lr(s: StrategyResult) -> str:
    if s.lr is None:
        return "-"
    return f"{s.lr:.3g} (searched)" if s.lr_search else f"{s.lr:.3g}"


def trade_off_table(results: CompareResults) -> tuple[list[str], list[list[str]]]:
    """The headers and rows (strings) of the full trade-off table, shared by the Markdown and HTML reports and
    a wide terminal. The first row is the untouched base model; figures over seeds are 'mean [low, high]'."""
    strategies = results.strategies
    classification = results.config.task == "classification" or any(s.val_accuracy is not None for s in strategies)
    tensor = any(s.tensor_peak_bytes is not None and "cuda" not in (s.peak_memory_source or "") for s in strategies)
    predicted = any(s.predicted_memory_bytes is not None for s in strategies)
    headers = ["strategy", "status", "params updated", memory_header(results),
               *(["tensor peak (allocator)"] * tensor), *(["plan predicts (tensor peak)"] * predicted),
               "artifact", "tokens/s", "train time", "val loss", "val accuracy" if classification else
               "val perplexity", forgetting_header(results),
               "serve " + "/".join(str(k) for k in TASK_COUNTS) + " tasks", "attach / load", "lr"]
    rows = [_base_row(results, tensor, predicted, classification)]
    for s in strategies:
        if s.status == "not applicable":  # never ran: no figures, the reason is in the run details
            rows.append([s.name, s.status] + ["-"] * (len(headers) - 2))
            continue
        attach = s.portability.attach_seconds if s.portability else None
        rows.append([s.name, s.status, _params(s), human_bytes(s.peak_memory_bytes),
                     *([human_bytes(s.tensor_peak_bytes)] * tensor), *([_predicted(s)] * predicted),
                     human_bytes(s.artifact_bytes), _num(s.tokens_per_second, ".0f"), _seconds(s.wall_seconds),
                     _with_spread(s, "val_loss", s.val_loss, ".4f"), _quality_cell(s, classification),
                     _forgetting_cell(s), _serve(s), _seconds(attach), _lr(s)])
    return headers, rows


def forgetting_header(results: CompareResults) -> str:
    """The forgetting column's label: which measure it holds (prose perplexity, or the classification probe)."""
    if _probe(results):
        return "forgetting: probe accuracy drop (+ = worse)"
    return "forgetting: prose ppl change (+ = worse)"


def _probe(results: CompareResults) -> bool:
    return results.baseline.probe_accuracy is not None


def _predicted(s: StrategyResult) -> str:
    """The plan's prediction, and its ratio to the measured tensor peak (like with like)."""
    if s.predicted_memory_bytes is None:
        return "-"
    if not s.tensor_peak_bytes:
        return human_bytes(s.predicted_memory_bytes)
    return f"{human_bytes(s.predicted_memory_bytes)} ({s.predicted_memory_bytes / s.tensor_peak_bytes:.2f}x)"


def _forgetting_cell(s: StrategyResult) -> str:
    sp = s.spread.get("forgetting_percent")
    if s.forgetting is None or sp is None or sp.n < 2:
        return _forgetting(s)
    return f"{s.forgetting.delta:+.3g} ({sp.mean:+.1f}% [{sp.low:+.1f}, {sp.high:+.1f}])"


def _base_row(results: CompareResults, tensor: bool, predicted: bool, classification: bool) -> list[str]:
    b = results.baseline
    quality = _num(b.val_accuracy, ".3f") if classification else _num(b.val_perplexity, ".4g")
    prose = (f"ppl {b.reference_perplexity:.4g} (before)" if b.reference_perplexity else
             f"acc {b.probe_accuracy:.3f} (before)" if b.probe_accuracy is not None else "-")
    return [BASE_ROW, "ok" if b.error is None else "failed", "0", "-", *(["-"] * tensor), *(["-"] * predicted),
            human_bytes(b.base_bytes), "-", "-", _num(b.val_loss, ".4f"), quality, prose, "-", "-", "-"]


def memory_header(results: CompareResults) -> str:
    """The peak-memory column's label: which quantity it is on this device."""
    if results.hardware.device == "cuda":
        return "peak memory (CUDA allocator)"
    return "peak RSS (OS, minus idle)"


def narrow_table(results: CompareResults) -> tuple[list[str], list[list[str]]]:
    """The table for an 80-column terminal: one row per strategy, the figures that decide, mean ±half-spread."""
    classification = results.config.task == "classification"
    key = "val_accuracy" if classification else "val_loss"
    headers = ["strategy", "val acc" if classification else "val loss", "probe acc" if _probe(results) else
               "prose ppl", "memory", "artifact", "tok/s"]
    b = results.baseline
    before = (f"ppl {b.reference_perplexity:.3g}" if b.reference_perplexity else
              f"acc {b.probe_accuracy:.3f}" if b.probe_accuracy is not None else "-")
    rows = [["base", _num(b.val_accuracy if classification else b.val_loss, ".3f"), before, "-",
             human_bytes(b.base_bytes), "-"]]
    for s in results.strategies:
        if s.status != "ok":
            rows.append([s.name, "n/a" if s.status == "not applicable" else "failed", "", "", "", ""])
            continue
        mem = s.tensor_peak_bytes if s.tensor_peak_bytes is not None else s.peak_memory_bytes
        rows.append([s.name, plus_minus(s.spread.get(key)) if key in s.spread else _num(getattr(s, key), ".3f"),
                     f"{s.forgetting.delta_percent:+.1f}%" if s.forgetting else "-", human_bytes(mem),
                     human_bytes(s.artifact_bytes), _num(s.tokens_per_second, ".0f")])
    return headers, rows


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
    """Which memory figures the table shows, and what `tunelab plan` is compared against."""
    sources = sorted({s.peak_memory_source for s in results.strategies if s.peak_memory_source})
    note = f"Peak memory source: {', '.join(sources) or 'not measured'}."
    if results.hardware.device != "cuda":
        note += (" On CPU the OS figure holds the interpreter, libraries and allocator caches too; the tensor "
                 "peak (weights + the CPU allocator's peak over 2 training steps at full batch x seq_len) is the "
                 "quantity tunelab plan predicts, and the plan column's ratio is against it.")
    return note


def print_table(results: CompareResults, console) -> None:
    """Print the trade-off table and the recommendation on a rich console: the full table on a wide console
    (200 columns or more), else the narrow view that fits 80 columns (the full one is in the report)."""
    wide = (console.width or 80) >= 200
    headers, rows = trade_off_table(results) if wide else narrow_table(results)
    table = Table(title="tunelab compare: trade-offs", show_lines=False, box=None if not wide else box.HEAVY_HEAD,
                  padding=(0, 1))
    for h in headers:
        table.add_column(h, justify="left" if h in ("strategy", "status") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if wide:
        console.print(memory_source_note(results))
    else:
        forgot = ("probe acc: drop in the forgetting probe's accuracy on a general labelled task" if _probe(results)
                  else "prose ppl: change in perplexity on general prose")
        na = ("; n/a: the method cannot apply to this model"
              if any(s.status == "not applicable" for s in results.strategies) else "")
        console.print(f"memory: tensor peak on CPU (what tunelab plan predicts), allocator peak on a GPU; {forgot}, "
                      f"+ = forgot more; ± half the spread over seeds{na}. Full table: report.md", markup=False,
                      highlight=False)
    for line in recommendation_lines(results) + [f"warning: {w}" for w in results.warnings]:
        console.print(line, markup=False, highlight=False)


# --- report files --------------------------------------------------------------------------------------

def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])


def _details(results: CompareResults) -> list[tuple[str, str]]:
    """(label, text) pairs of run metadata, warnings, failures and notes, for both report formats."""
    hw, cfg, b = results.hardware, results.config, results.baseline
    gpu = f"{hw.gpu_name} ({human_bytes(hw.gpu_memory_bytes)})" if hw.gpu_name else "none"
    given = {"steps": f"--max-steps {cfg.max_steps}", "epochs": f"--epochs {cfg.epochs:g}",
             "tokens": f"--tokens {cfg.tokens}"}[cfg.budget]
    seeds = ", ".join(str(cfg.seed + i) for i in range(cfg.seeds))
    out = [*(("Warning", w) for w in results.warnings),
           ("Hardware", f"{hw.cpu_model}, {hw.cpu_cores} cores, RAM {human_bytes(hw.ram_bytes)}, GPU {gpu}"),
           ("Devices", _devices_text(results)),
           ("Load average", _load_text(results)),
           ("Versions", ", ".join(f"{k} {v}" for k, v in results.versions.items())),
           ("Budget", f"model {cfg.model}, data {cfg.data}, {results.steps or cfg.max_steps} steps per run "
                      f"(--budget {cfg.budget}, {given}; {b.train_examples or '?'} training examples), batch "
                      f"{cfg.batch_size}, seq_len {cfg.seq_len}, seeds {seeds}; figures over seeds are "
                      f"mean [min, max] for 2 seeds, mean [95% interval] for 3 or more"),
           ("Learning rates", _lr_text(results)),
           ("Forgetting", _forgetting_text(results)),
           ("Baseline", f"the untouched {cfg.model} on the same validation batches: val loss "
                        f"{_num(b.val_loss, '.4f')}, perplexity {_num(b.val_perplexity, '.4g')}, accuracy "
                        f"{_num(b.val_accuracy, '.3f')}")]
    for s in results.strategies:
        if s.lr_search:
            curve = ", ".join(f"{lr:.3g}: {_num(loss, '.4f')}" for lr, loss in s.lr_search.curve)
            beyond = ", ".join(f"{lr:.3g}" for lr in s.lr_search.extended)
            beyond = f" (beyond the grid, its best at an edge: {beyond})" if beyond else ""
            out.append((f"{s.name} lr search", f"{s.lr_search.steps} steps, seed {s.lr_search.seed}; val loss by "
                                               f"lr {curve}{beyond}; chosen {s.lr_search.chosen_lr:.3g}"))
        if s.error:
            out.append((f"{s.name} {'not applicable' if s.status == 'not applicable' else 'failed'}", s.error))
        out += [(f"{s.name} note", n) for n in s.notes]
    return out


def _forgetting_text(results: CompareResults) -> str:
    b, cfg = results.baseline, results.config
    if b.probe_accuracy is not None:
        return (f"a linear probe on {cfg.reference_data} ({b.probe_classes} classes): ridge regression on the "
                f"encoder's mean-pooled last hidden state, fit on {b.probe_train_examples} examples and scored on "
                f"{b.probe_test_examples} held out, with the trained adapter active, against the base model's "
                f"accuracy {b.probe_accuracy:.3f}; a positive change (lower accuracy) means the encoder lost more "
                f"general knowledge, so higher is worse")
    if b.reference_perplexity is None:
        return f"not measured (the {'forgetting probe' if cfg.task == 'classification' else 'reference prose'} " \
               f"could not be scored)"
    return (f"perplexity on the first {b.reference_sequences} sequences of {cfg.reference_data} "
            f"({b.reference_tokens} tokens) with the trained adapter active, against the base model's "
            f"{b.reference_perplexity:.4g}; a positive change (higher perplexity) means the model forgot more of "
            f"general prose, so higher is worse")


def _load_text(results: CompareResults) -> str:
    loads = results.load_average
    if not loads:
        return "not recorded"
    return (f"1-minute load average while timing: mean {sum(loads) / len(loads):.2f}, max {max(loads):.2f} "
            f"({len(loads)} samples) on {results.hardware.cpu_cores} cores")


def _devices_text(results: CompareResults) -> str:
    devices = results.devices
    if len(devices) < 2:
        return f"{devices[0] if devices else results.hardware.device}, one worker at a time"
    return (f"{', '.join(devices)}: the runs spread over {len(devices)} devices, one worker per device at a time "
            f"(each worker sees only its own GPU, so its memory and time figures are its own)")


def _lr_text(results: CompareResults) -> str:
    if results.tune_lr:
        return (f"searched per strategy (--tune-lr): factors {results.config.lr_grid} of each method's default "
                f"lr on {results.config.tune_fraction:g} of the budget, extended one grid step further out (at "
                f"most {MAX_EXTENSIONS} times) while the best lr is the largest or smallest tried; the lowest validation loss "
                f"trains the full runs (--lr-for values are used as given)")
    return ("each method's default lr (or --lr-for); not searched (--tune-lr off), so a method that needs another "
            "lr in this budget may look worse than it is")


def write_markdown(results: CompareResults, path: Path, plots: dict[str, Path]) -> Path:
    """Write `report.md`: the recommendation, the table, links to the plots, and the run's metadata."""
    headers, rows = trade_off_table(results)
    parts = ["# tunelab compare", "", *recommendation_lines(results), "", _md_table(headers, rows), "",
             memory_source_note(results), ""]
    parts += [f"![{name}]({p.relative_to(path.parent).as_posix()})" for name, p in plots.items()]
    parts += ["", "## Run", ""] + [f"- **{label}**: {text}" for label, text in _details(results)]
    write_text_atomic(path, "\n".join(parts) + "\n")
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
    write_text_atomic(path, f"<!doctype html><html><head><meta charset='utf-8'><title>tunelab compare</title>"
                      f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")
    return path


def write_reports(results: CompareResults, out_dir: Path) -> tuple[Path, Path]:
    """Draw the plots into `out_dir/plots/` and write `report.md` and `report.html`; returns their paths."""
    out_dir = Path(out_dir)
    plots = make_plots(results, out_dir / "plots")
    return write_markdown(results, out_dir / "report.md", plots), write_html(results, out_dir / "report.html", plots)
