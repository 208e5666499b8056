"""Small-sample statistics that the benchmark and the report share: a mean with its spread, and a Student-t
interval for the mean of paired differences (NOAH's per-round overhead, an accuracy delta per seed).

The t quantile is computed here, exactly, rather than taken from scipy: scipy is only a transitive
dependency (of mlflow), and a short table would be too narrow for the tens of rounds a benchmark takes."""
from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean of one or more values and their sample standard deviation (n − 1: the values are a sample of
    runs, not all of them); None for a single value's: one value measures no spread (0.0 would claim none)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _t_central(theta: float, df: int) -> float:
    """P(|T| ≤ √df·tan θ) for Student's t with `df` degrees of freedom: the finite series of Abramowitz &
    Stegun 26.7.3 (odd df) and 26.7.4 (even df), exact for whole df."""
    odd = df % 2
    c2 = math.cos(theta) ** 2
    total, term = 0.0, 1.0
    for j in range(df // 2):
        if j:
            term *= c2 * (2 * j - 1 + odd) / (2 * j + odd)
        total += term
    if odd:
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    return math.sin(theta) * total


@functools.cache
def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| ≤ t) = `level` (e.g. 12.706 for 0.95 and df 1, 1.984 for df 100): bisection on the
    angle θ = atan(t/√df) in (0, π/2), where the probability rises monotonically. Cached: each benchmark
    row asks for the same run of df again, one more every round."""
    low, high = 0.0, math.pi / 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_central(mid, df) < level else (low, mid)
    return math.sqrt(df) * math.tan((low + high) / 2)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float] | None:
    """(mean, low, high): the Student-t interval mean ± t·s/√n for the mean of independent values, such as
    paired differences; None for fewer than two values, which give no spread to build it from."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    half = t_quantile(level, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half
