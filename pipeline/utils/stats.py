"""The statistics the reports rest on: means over seeds, their spread, paired 95% intervals and a test
against chance. One place, so a difference is called resolved by one rule everywhere.

Intervals are Student-t intervals over independent repeats (seeds, or timing rounds): with few repeats the
t quantile widens them honestly (2 repeats: ×12.7 the standard error), where a normal quantile would not.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from scipy import stats

LEVEL = 0.95


def mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def sample_std(values: Sequence[float]) -> float | None:
    """The sample standard deviation (n − 1); None below two values, where there is none."""
    return statistics.stdev(values) if len(values) >= 2 else None


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float] | None:
    """The `level` Student-t interval of the mean of `values`; None below two values."""
    if len(values) < 2:
        return None
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    centre = statistics.fmean(values)
    return float(centre - half), float(centre + half)


def resolved(interval: tuple[float, float] | None) -> bool:
    """Whether an interval of a difference excludes zero: the only case a report marks a difference. A
    zero-width interval (identical differences, e.g. one image apart on every seed) is no evidence."""
    return interval is not None and interval[0] < interval[1] and (interval[0] > 0 or interval[1] < 0)


def above_chance(percent: float, chance: float, trials: int, level: float = LEVEL) -> bool:
    """Whether a hit rate of `percent` % over `trials` evaluations is above a chance level of `chance` %:
    the one-sided binomial test of a model that ignores its input rejects at `level`."""
    if trials < 1:
        return False
    hits = round(percent / 100 * trials)
    return bool(stats.binomtest(hits, trials, min(max(chance / 100, 0.0), 1.0), "greater").pvalue < 1 - level)
