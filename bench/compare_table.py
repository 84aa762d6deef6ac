"""The README's compare table, from a compare's results.json: one row for the untouched base model, one per strategy.

    python bench/compare_table.py bench/results/compare_smollm2_cpu.json
    python bench/compare_table.py bench/results/compare_h200_minilm.json --recommend   # + today's rule's pick

Figures over seeds are means with their spread (min-max for 2 seeds, 95% interval for 3 or more), as in the
report; memory is the tensor peak on CPU (the quantity `tunelab plan` predicts) with the OS RSS growth beside it,
or the CUDA allocator peak on a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunelab.measure.portability import human_bytes  # noqa: E402
from tunelab.measure.schema import CompareResults  # noqa: E402
from tunelab.measure.stats import spread_text  # noqa: E402


def _cell(s, key: str, value, fmt: str) -> str:
    sp = s.spread.get(key)
    if sp is not None and sp.n >= 2:
        return spread_text(sp, fmt)
    return "-" if value is None else format(value, fmt)


def table(results: CompareResults) -> str:
    """Markdown rows: strategy, lr, params updated, memory, artifact, tokens/s, val quality, forgetting."""
    cls = results.config.task == "classification"
    cuda = results.hardware.device == "cuda"
    mem = "peak memory (CUDA allocator)" if cuda else "tensor peak / RSS growth"
    quality = "val accuracy" if cls else "val loss"
    b = results.baseline
    probe = b.probe_accuracy is not None
    forgot = "probe accuracy drop" if probe else "prose ppl change"
    head = f"| strategy | lr | params updated | {mem} | artifact | tokens/s | {quality} | {forgot} (+ = worse) |"
    before = (f"acc {b.probe_accuracy:.3f}" if probe else
              "-" if b.reference_perplexity is None else f"ppl {b.reference_perplexity:.4g}")
    base_q = b.val_accuracy if cls else b.val_loss
    rows = [head, "|" + "---|" * 8,
            f"| base (no tuning) | - | 0 | - | {human_bytes(b.base_bytes)} | - | "
            f"{'-' if base_q is None else format(base_q, '.3f')} | {before} |"]
    for s in results.strategies:
        if s.status != "ok":
            rows.append(f"| {s.name} | {s.status}: {s.error} | | | | | | |")
            continue
        memory = human_bytes(s.peak_memory_bytes) if cuda else \
            f"{human_bytes(s.tensor_peak_bytes)} / {human_bytes(s.peak_memory_bytes)}"
        lr = f"{s.lr:.2g}" + (" (searched)" if s.lr_search else "")
        pct = (f"{s.trainable_percent:.2g}%" if (s.trainable_percent or 0) < 10 else f"{s.trainable_percent:.0f}%") \
            if s.trainable_percent is not None else ""
        forget = _cell(s, "forgetting_percent", s.forgetting.delta_percent if s.forgetting else None, "+.1f")
        rows.append(f"| {s.name} | {lr} | {s.params_trainable:,} ({pct}) | {memory} | "
                    f"{human_bytes(s.artifact_bytes)} | {s.tokens_per_second:.0f} | "
                    f"{_cell(s, 'val_accuracy' if cls else 'val_loss', s.val_accuracy if cls else s.val_loss, '.3f')}"
                    f" | {forget}{'%' if s.forgetting else ''} |")
    return "\n".join(rows)


def recommendation(results: CompareResults) -> str:
    """The current rule (tunelab.measure.recommend) applied to a results file's measurements, with the run's
    own settings (priority, memory budget, tasks): what compare recommends today from those figures."""
    from tunelab.measure.recommend import recommend

    c = results.config
    rec = recommend(results.strategies, priority=c.priority, gpu_memory=c.gpu_memory, tasks=c.tasks)
    return "\n".join([f"Recommended today: {rec.strategy} (priority {c.priority}, {c.tasks} task(s))",
                      *(f"- {r}" for r in rec.reasons)])


if __name__ == "__main__":
    results = CompareResults.model_validate_json(Path(sys.argv[1]).read_text())
    print(table(results))
    if "--recommend" in sys.argv[2:]:
        print()
        print(recommendation(results))
