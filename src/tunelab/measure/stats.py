"""Statistics over seeds: the mean and spread of each figure, and when two strategies cannot be told apart.

With N values of a figure (one per seed that finished):
- N = 1: the value itself ("single run"; nothing can be said about noise);
- N = 2: the mean and the min-max range;
- N >= 3: the mean and its 95% confidence interval, mean +- t(0.975, N-1) * sd / sqrt(N) (Student's t, sample
  standard deviation).

Two strategies are indistinguishable in a figure when both have N >= 2 and their spreads overlap: the difference
of their means is within run-to-run noise at this number of seeds. docs/compare.md states the same rule.
"""

from __future__ import annotations

import math
import statistics

from tunelab.measure.schema import Spread

# Student's t, two-sided 95% (the 0.975 quantile), by degrees of freedom; above 30 the normal 1.96.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom."""
    return T_975.get(df, 1.96)


def spread(values: list[float]) -> Spread | None:
    """Mean and spread of `values` (None and non-finite values left out); None when nothing is left."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None
    mean = statistics.fmean(xs)
    if len(xs) == 1:
        return Spread(n=1, mean=mean, low=mean, high=mean, kind="single run")
    if len(xs) == 2:
        return Spread(n=2, mean=mean, low=min(xs), high=max(xs), kind="min-max")
    half = t_975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return Spread(n=len(xs), mean=mean, low=mean - half, high=mean + half, kind="95% interval")


def indistinguishable(a: Spread | None, b: Spread | None) -> bool:
    """Whether two figures cannot be told apart: both measured at least twice, and their spreads overlap."""
    if a is None or b is None or a.n < 2 or b.n < 2:
        return False
    return a.low <= b.high and b.low <= a.high


def spread_text(s: Spread | None, fmt: str = ".4g") -> str:
    """'2.369 [2.351, 2.387]' (mean [low, high]); a single run shows its value alone; None shows '-'."""
    if s is None:
        return "-"
    if s.n < 2:
        return format(s.mean, fmt)
    return f"{format(s.mean, fmt)} [{format(s.low, fmt)}, {format(s.high, fmt)}]"


def plus_minus(s: Spread | None, fmt: str = ".3f") -> str:
    """'2.369 ±0.018' (mean ± half the spread) for narrow tables; a single run shows its value alone."""
    if s is None:
        return "-"
    if s.n < 2:
        return format(s.mean, fmt)
    return f"{format(s.mean, fmt)} ±{format((s.high - s.low) / 2, fmt)}"
