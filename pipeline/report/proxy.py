"""The proxy study read against the paper: per backbone, the NOAH-vs-baseline top-1 delta it measured beside
the paper's delta for the same backbone.

A proxy (a class subset, smaller images, fewer epochs, one GPU) never reproduces the paper's numbers, so only
deltas are compared, on three counts: whether the measured mean has the paper's sign, whether its 95%
interval over seeds excludes zero (a direction that does not resolve is no evidence either way), and its size
against the paper's (the ratio, and where the paper's delta lies against the measured interval).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..utils.stats import resolved

COLUMNS = ("paper_top1_delta", "direction_agrees", "delta_resolved", "delta_ratio", "size_vs_paper")
"""The report CSV's columns of the comparison, filled on the NOAH rows."""


@dataclass(frozen=True)
class Comparison:
    """One backbone's measured top-1 delta (mean paired difference over seeds, with its 95% interval when
    there are two pairs or more) and the paper's delta, in points."""

    network: str
    paper: float
    measured: float | None
    interval: tuple[float, float] | None

    @property
    def agrees(self) -> bool | None:
        """The measured mean has the paper's sign (None without a measurement or a paper delta of zero)."""
        if self.measured is None or self.paper == 0:
            return None
        return (self.measured > 0) == (self.paper > 0)

    @property
    def resolved(self) -> bool | None:
        return None if self.interval is None else resolved(self.interval)

    @property
    def ratio(self) -> float | None:
        return None if self.measured is None or self.paper == 0 else self.measured / self.paper

    @property
    def size(self) -> str | None:
        """`smaller`, `larger` or `consistent`: the measured interval below, above or around the paper's delta."""
        if self.interval is None:
            return None
        low, high = self.interval
        return "smaller" if high < self.paper else "larger" if low > self.paper else "consistent"

    def record(self) -> dict[str, str]:
        """The CSV's comparison columns (`COLUMNS`); empty where there is no value."""
        flags = {"direction_agrees": self.agrees, "delta_resolved": self.resolved}
        return {"paper_top1_delta": f"{self.paper:.10g}",
                **{k: "" if v is None else str(v).lower() for k, v in flags.items()},
                "delta_ratio": "" if self.ratio is None else f"{self.ratio:.10g}", "size_vs_paper": self.size or ""}


def _signed(value: float, decimals: int) -> str:
    return f"{value:+.{decimals}f}".replace("-", "−")


def _word(flag: bool | None) -> str:
    return "—" if flag is None else "yes" if flag else "no"


def banner(profile: str) -> list[str]:
    """The block a proxy report opens with: what it is and what it is not."""
    return [f"> **A proxy, not a reproduction.** Trained at the `{profile}` profile (a class subset of ImageNet, "
            "smaller images, fewer epochs: the scale line above). Its absolute accuracies are not comparable with "
            "the paper's columns (all 1,000 classes at 224×224 after the full recipes); only each backbone's "
            "NOAH-vs-baseline top-1 delta is set beside the paper's, below the table."]


def markdown(comparisons: list[Comparison], decimals: int) -> list[str]:
    """The comparison as a Markdown section: one row per backbone."""
    out = ["## NOAH's top-1 delta against the paper's", "",
           "| Backbone | Measured Δ top-1 [95% interval] | Paper Δ top-1 | Same direction | Resolved | "
           "Measured / paper | Size against the paper's |", "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        measured = "—" if c.measured is None else _signed(c.measured, decimals) + (
            "" if c.interval is None else " [" + ", ".join(_signed(v, decimals) for v in c.interval) + "]")
        ratio = "—" if c.ratio is None else f"{c.ratio:.2f}×".replace("-", "−")
        out.append(f"| {c.network} | {measured} | {_signed(c.paper, decimals)} | {_word(c.agrees)} | "
                   f"{_word(c.resolved)} | {ratio} | {c.size or '—'} |")
    return out + ["", "Same direction: the measured mean has the paper's sign. Resolved: its 95% interval over "
                  "seeds excludes zero; a direction that is not resolved is no evidence either way. Size: the "
                  "measured interval lies below (smaller), above (larger) or around (consistent) the paper's "
                  "delta. A finding here is about this scale; it neither confirms nor refutes the paper's "
                  "numbers."]
