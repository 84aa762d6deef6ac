"""What a compare decides once the baseline worker has looked at the model and data: the budget in steps, the
method options compare sets by itself, and the warnings about how far its figures can be trusted.

- Budget: `steps` is `max_steps`; `epochs` is ceil(epochs x ceil(train examples / batch size)); `tokens` is
  ceil(tokens / (batch size x mean non-pad tokens per training example)).
- bitfit on a model without bias terms (Llama, SmolLM2) trains its norm weights instead (`include_norms`),
  unless the user set `--set-for bitfit.include_norms=...`.
- Warnings: a busy machine while timing (mean 1-minute load average above `BUSY_LOAD` x cores; the compare's
  own worker accounts for about one core's worth per core it uses), one seed only (no spread), forgetting too
  small to show (every strategy moved prose perplexity, or the classification probe's accuracy, by less than
  `FORGETTING_VISIBLE_PERCENT`).
"""

from __future__ import annotations

import math
import os
import statistics
import time

from tunelab.errors import TunelabError
from tunelab.measure.schema import Baseline, CompareOptions, CompareResults
from tunelab.train.batches import steps_per_epoch

BUSY_LOAD = 1.25  # load average per core above which the timings were shared with other work
FORGETTING_VISIBLE_PERCENT = 1.0  # below this change in prose perplexity, forgetting has not shown yet
LOAD_SAMPLE_SECONDS = 10.0


def budget_steps(opts: CompareOptions, baseline: Baseline) -> int:
    """The optimizer steps every strategy trains, from `--budget steps|epochs|tokens`."""
    if opts.budget == "steps":
        return opts.max_steps
    n, tokens = baseline.train_examples, baseline.train_tokens
    if not n or not tokens:
        raise TunelabError(f"--budget {opts.budget}: the training split of {opts.data} is empty; "
                           f"expected training examples to size the budget")
    if opts.budget == "epochs":
        return max(1, math.ceil(opts.epochs * steps_per_epoch(n, opts.batch_size, 1)))
    return max(1, math.ceil(opts.tokens / (opts.batch_size * tokens / n)))


def auto_options(opts: CompareOptions, name: str, baseline: Baseline) -> tuple[dict, list[str]]:
    """(method options, notes): the user's `--set-for` options, plus what compare sets so the method can run."""
    options = dict(opts.options_for.get(name, {}))
    if name == "bitfit" and baseline.bias_terms is False and "include_norms" not in options:
        options["include_norms"] = True
        return options, ["the model has no bias terms: compare set include_norms=true, so bitfit trains the "
                         "norm weights (as deltas) instead"]
    return options, []


class LoadSampler:
    """Samples the 1-minute load average at most every `LOAD_SAMPLE_SECONDS` while the compare times things."""

    def __init__(self):
        self.samples: list[float] = []
        self._last = -math.inf

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last >= LOAD_SAMPLE_SECONDS and hasattr(os, "getloadavg"):
            self._last = now
            self.samples.append(round(os.getloadavg()[0], 2))


def warnings_for(results: CompareResults) -> list[str]:
    """What the reader must know before trusting the differences in the table."""
    out = []
    cores, loads = results.hardware.cpu_cores, results.load_average
    if loads and statistics.fmean(loads) > BUSY_LOAD * cores:
        out.append(f"the machine was busy while timing: mean 1-minute load average {statistics.fmean(loads):.1f} "
                   f"(max {max(loads):.1f}) on {cores} cores; tokens/s and times are lower than on an idle "
                   f"machine")
    if results.config.seeds < 2:
        out.append("one seed per strategy: the table has no spread, and differences in quality may be "
                   "run-to-run noise (use --seeds 3)")
    ok = [s for s in results.strategies if s.status == "ok" and s.forgetting is not None]
    if ok and all(abs(s.forgetting.delta_percent) < FORGETTING_VISIBLE_PERCENT for s in ok):
        what = ("the forgetting probe's accuracy" if ok[0].forgetting.measure == "probe_accuracy"
                else "prose perplexity")
        out.append(f"the budget ({results.steps} steps) is too small for forgetting to show: every strategy moved "
                   f"{what} by less than {FORGETTING_VISIBLE_PERCENT:g}% (train longer, e.g. "
                   f"--budget epochs --epochs 3)")
    return out
