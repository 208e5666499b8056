"""One report table: the paper's rows joined with a results file, rendered as Markdown and as a tidy CSV.

Rows come from the paper (never dropped, never reordered); a row the results lack, a failed trial or an
unreadable results file becomes "—" with the reason in a footnote, so a partial study still reads correctly.
A result the paper has no row for (another registered backbone, a row params.yaml adds) follows the paper's
rows (Table 10: within its family) with empty paper columns and a note, and is never compared with the paper.

A trained row holds one run per seed: its value is the mean over the seeds that finished, with the sample
std, and its difference to the block's baseline is the mean of the per-seed differences (paired by seed)
with a Student-t 95% interval (`utils.stats`). A difference is marked (arrow; bold when better) only when
that interval excludes zero. Params and MAdds are the model at the paper's settings, so they compare with
the paper's columns; the trained model's own counts are the CSV's `trained_params` and `trained_madds`.
"""
from __future__ import annotations

import html
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils.io import csv_text
from ..utils.stats import above_chance, mean, resolved, sample_std, t_interval
from . import proxy
from .specs import (
    FAMILIES,
    Metric,
    PaperRow,
    TableSpec,
    backbone_family,
    backbone_name,
    changed_settings,
    guess_notes,
    is_baseline,
    paper_complexity,
    paper_rows,
    unprinted_row,
)

DASH = "—"
SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
META_KEYS = ("dataset", "num_classes", "img_size", "width", "epochs", "profile", "commit", "date")
TIMING_KEYS = ("img_size", "cpu", "gpu", "commit", "date")  # Table 10 times random inputs: no dataset


@dataclass
class Results:
    """A results file as read: its meta, its rows by paper row number, or why it could not be used."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None


def load_results(path: Path, spec: TableSpec) -> Results:
    """Read a table's results (`results/[study/]<table>.json`); a missing or malformed file gives an `error`,
    never an exception."""
    res = Results(Path(path))
    if not res.path.exists():
        res.error = f"{res.path.name} not produced yet (the `{spec.producer}` stage has not written it)"
        return res
    try:
        data = json.loads(res.path.read_text())
        res.meta = dict(data.get("meta") or {})
        keyed = {r["key"]: r for r in paper_rows(spec)} if spec.groups else {}
        for item in data.get("rows") or []:
            number = item.get("row")
            key = item.get("key") or item.get("backbone")
            if number is None and spec.groups:  # the benchmark's rows are its backbones; one the paper does not
                # time follows the paper's
                number = keyed[key]["row"] if key in keyed else max([len(keyed), *res.rows]) + 1
            if spec.seeded and not isinstance(item.get("runs"), list):
                raise KeyError(f"row {number} has no list of per-seed `runs`")
            res.rows[int(number)] = item
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        res.meta, res.rows = {}, {}
        res.error = f"{res.path.name} could not be read ({type(err).__name__}: {err})"
    return res


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class Delta:
    """A row's mean paired difference to its baseline over the seeds both finished, and its 95% interval
    (None with fewer than two pairs)."""

    mean: float
    interval: tuple[float, float] | None

    @property
    def resolved(self) -> bool:
        return resolved(self.interval)


@dataclass
class Line:
    """One paper row with its measured values (None where there is none) and why a value is missing."""

    paper: PaperRow
    network: str
    status: str
    reason: str | None
    result: dict[str, Any]
    samples: dict[str, dict[int, float]]  # per trained metric: its value per finished seed
    values: dict[str, float | None]
    paper_values: dict[str, float | None]
    n: int = 0  # seeds whose every trial finished
    changed_settings: list[str] = field(default_factory=list)  # how the trained row differs from the paper's
    notes: list[str] = field(default_factory=list)
    reasons: dict[str, str | None] = field(default_factory=dict)  # per metric: why it has no value
    trained: dict[str, int] = field(default_factory=dict)  # the trained model's own params and madds
    above_chance: bool | None = None  # its top-1 tested against the dataset's chance level (None: untested)
    baseline: Line | None = None
    printed: bool = True  # False: a result the paper has no row for (its paper columns stay empty)

    @property
    def row(self) -> int:
        return int(self.paper["row"])

    @property
    def name(self) -> str | None:
        """The row's name in params.yaml (`tables.<table>.rows.<name>`), as its result carries it; Table 10's
        rows are its backbones. None without a result."""
        return self.result.get("name") or self.result.get("key")

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.result.get("runs") or []

    @property
    def run(self) -> dict[str, Any]:
        """The first finished seed's run (what the figures draw), else the first run."""
        return next((r for r in self.runs if _outcomes(r) == {"": ("FINISHED", None)}), self.runs[0]) \
            if self.runs else {}

    def std(self, metric: str) -> float | None:
        return sample_std(list(self.samples.get(metric, {}).values()))

    def delta(self, metric: str) -> Delta | None:
        """The difference to the block's baseline, paired by seed, or None without a common finished seed."""
        if self.baseline is None or metric not in self.samples:
            return None
        ours, base = self.samples[metric], self.baseline.samples.get(metric, {})
        diffs = [ours[s] - base[s] for s in ours if s in base]
        return Delta(mean(diffs), t_interval(diffs)) if diffs else None


def _paper_value(row: PaperRow, m: Metric) -> float | None:
    text = row.get(m.paper, "")
    return float(text) * m.scale if text else None


def _outcomes(result: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    """Status and reason per trial kind: `""` for `status`, `scratch_` for `scratch_status` (Table 9 trains
    each row twice); a row with no status at all (the benchmark's) counts as finished."""
    out = {}
    for key, value in result.items():
        if key.endswith("status") and value:
            kind, status = key[: -len("status")], str(value).upper()
            why = result.get(f"{kind}reason") or "no reason given"
            label = f"{kind.rstrip('_')} trial" if kind else "trial"
            out[kind] = (status, None if status == "FINISHED" else f"{label} {status}: {why}")
    return out or {"": ("FINISHED", None)}


def _overall(outcomes: dict[str, tuple[str, str | None]]) -> tuple[str, str | None]:
    statuses = {s for s, _ in outcomes.values()}
    status = "FINISHED" if statuses == {"FINISHED"} else "FAILED" if "FAILED" in statuses else \
        next(iter(sorted(statuses - {"FINISHED"})))
    return status, "; ".join(r for _, r in outcomes.values() if r) or None


def _metric_outcome(outcomes: dict[str, tuple[str, str | None]], metric: str) -> tuple[str, str | None]:
    """The outcome of the trial kind a metric belongs to (`scratch_map` → `scratch_`), else the row's."""
    kinds = [k for k in outcomes if k and metric.startswith(k)]
    return outcomes[max(kinds, key=len)] if kinds else outcomes.get("", _overall(outcomes))


def _seeded(reason: str | None, run: dict[str, Any], runs: list[dict[str, Any]]) -> str | None:
    """`reason` with `seed N: ` before it when the row has several seeds."""
    return reason if len(runs) == 1 or reason is None else f"seed {run.get('seed')}: {reason}"


def _trained_line(spec: TableSpec, row: PaperRow, result: dict[str, Any], error: str | None,
                  printed: bool = True) -> Line:
    """A row of a trained table: per-seed samples of each trained metric, their means, and the model's
    Params and MAdds at the paper's settings (those of the row as it ran, else of the paper's row)."""
    runs = result.get("runs") or []
    per_run = [_outcomes(run) for run in runs]
    samples: dict[str, dict[int, float]] = {}
    values, reasons = {}, {}
    outcomes = {"": ("MISSING", error)} if error else \
        {f"{kind}@{run.get('seed')}": (status, _seeded(why, run, runs))
         for run, kinds in zip(runs, per_run) for kind, (status, why) in kinds.items()} if runs else \
        {"": ("MISSING", f"no result for this row in {spec.name}.json")}
    status, reason = _overall(outcomes)
    complexity = paper_complexity(spec, row, result)
    for m in spec.metrics:
        if not m.trained:
            values[m.name] = complexity.get(m.name)
            reasons[m.name] = None if values[m.name] is not None else complexity.get("error")
            continue
        samples[m.name], why = {}, []
        for run, kinds in zip(runs, per_run):
            run_status, run_reason = _metric_outcome(kinds, m.name)
            value = _number(run.get(m.source or m.name)) if run_status == "FINISHED" else None
            if value is not None:
                samples[m.name][run.get("seed")] = value
            elif run_reason:
                why.append(_seeded(run_reason, run, runs))
        values[m.name] = mean(list(samples[m.name].values()))
        reasons[m.name] = None if values[m.name] is not None else "; ".join(why) or reason or \
            f"{spec.name}.json holds no value for this column of a {status} trial"
    n = sum(all(s == "FINISHED" for s, _ in kinds.values()) for kinds in per_run)
    first = next((r for r in runs if r.get("params") is not None), {})
    trained = {k: int(first[k]) for k in ("params", "madds") if first.get(k) is not None}
    line = Line(row, spec.network(row), status, reason, result, samples, values,
                {m.name: _paper_value(row, m) for m in spec.metrics}, n,
                changed_settings(spec, row, result) if printed else [], guess_notes(spec, row), reasons, trained,
                printed=printed)
    if 0 < n < len(runs):
        line.notes.append(f"mean over the {n} of {len(runs)} seeds that finished")
    return line


def _timed_line(spec: TableSpec, row: PaperRow, result: dict[str, Any], error: str | None,
                printed: bool = True) -> Line:
    """A row of the benchmark: its values as timed (no seeds, nothing trained)."""
    status, reason = ("MISSING", error) if error else ("MISSING", f"no result for this row in {spec.name}.json") \
        if not result else ("FINISHED", None)
    values = {m.name: _number(result.get(m.source or m.name)) for m in spec.metrics}
    reasons = {m.name: reason or (None if values[m.name] is not None else
                                  f"{spec.name}.json holds no value for this column") for m in spec.metrics}
    return Line(row, spec.network(row), status, reason, result, {}, values,
                {m.name: _paper_value(row, m) for m in spec.metrics}, reasons=reasons, printed=printed)


NOT_PRINTED = "the paper prints no such row: nothing here is compared with the paper"


def build_lines(spec: TableSpec, results: Results) -> list[Line]:
    """The paper's rows in order, each joined with its result and linked to its block's baseline row, then the
    results the paper has no row for (`unprinted_row`), in row order; Table 10 keeps each within its family."""
    lines: list[Line] = []
    baselines: dict[str, Line] = {}
    printed = paper_rows(spec)
    numbers = {int(row["row"]) for row in printed}
    extra = [unprinted_row(spec, n, results.rows[n]) for n in sorted(results.rows) if n not in numbers]
    for row in [*printed, *extra]:
        is_printed = int(row["row"]) in numbers
        result = results.rows.get(int(row["row"])) or {}
        line = (_trained_line if spec.seeded else _timed_line)(spec, row, result, results.error, is_printed)
        if not is_printed:
            line.notes.insert(0, NOT_PRINTED)
        if is_baseline(row):
            baselines[row["key"]] = line
        else:
            line.baseline = baselines.get(row["key"])
        lines.append(line)
    if spec.groups:  # a stable sort: the paper's rows keep their order, another backbone joins its family
        order = list(FAMILIES)
        lines.sort(key=lambda ln: order.index(f) if (f := backbone_family(ln.paper["key"])) in order else len(order))
    if spec.seeded:
        _flag_chance(spec, results.meta, lines)
        _flag_machines(lines)
    return lines


def _flag_chance(spec: TableSpec, meta: dict[str, Any], lines: list[Line]) -> None:
    """A note on every trained row whose top-1 is not above the dataset's chance level (`evidence_lines`)."""
    chance = meta.get("chance") or {}
    if chance.get("top1") is None or not chance.get("images"):
        return
    for line in lines:
        for m in spec.metrics:
            value = line.values[m.name]
            if not (m.trained and m.delta and m.name.endswith("top1")) or value is None:
                continue
            above = above_chance(value, chance["top1"], chance["images"] * len(line.samples[m.name]))
            line.above_chance = above and line.above_chance is not False
            if not above:
                line.notes.append(f"{m.label} not above chance ({chance['top1']:.2f}%): nothing can be read "
                                  "into this row's accuracy")


def _flag_machines(lines: list[Line]) -> None:
    """A note on every row trained (or reused from a run) on another kind of machine than the table's most
    common: bit-exact repeats hold only on one kind (README, "Repeatability")."""
    kinds = Counter(kind for line in lines for run in line.runs for kind in _machines(run))
    if len(kinds) < 2:
        return
    common = kinds.most_common(1)[0][0]
    for line in lines:
        for other in sorted({kind for run in line.runs for kind in _machines(run)} - {common}):
            line.notes.append(f"trained on {other}, unlike most of this table ({common})")


def _machines(run: dict[str, Any]) -> list[str]:
    """The kinds of machine a seed's trials ran on (`machine`; Table 9's `scratch_machine`, `finetune_machine`)."""
    return [v for k, v in run.items() if k.endswith("machine") and v]


def _blocks(lines: list[Line]) -> list[list[Line]]:
    """Runs of rows that share a baseline: the unit within which the paper's best value is bolded."""
    blocks: list[list[Line]] = []
    for line in lines:
        if not blocks or (is_baseline(line.paper) and blocks[-1]):
            blocks.append([])
        blocks[-1].append(line)
    return blocks


def _best(values: list[float | None], better: str | None) -> float | None:
    present = [v for v in values if v is not None]
    if not present or better is None:
        return None
    return max(present) if better == "max" else min(present)


def _fmt(value: float, m: Metric, decimals: int) -> str:
    if m.kind == "params":
        return f"{value / 1e6:.2f}M"
    if m.kind == "params_m":
        return f"{value:.2f}M"
    if m.kind == "madds":
        g = value / 1e9
        return f"{g:.2f}G" if g >= 0.995 else f"{g:.4f}G"
    return f"{value:.{decimals}f}"


def _paper_delta(value: float, base: float, decimals: int) -> str:
    diff = round(value - base, decimals)
    arrow = "↑" if diff > 0 else "↓" if diff < 0 else "±"
    return f"({arrow}{abs(diff):.{decimals}f})"


def _measured_delta(delta: Delta, decimals: int) -> str:
    """`(↑0.52 [0.10, 0.94])` when the interval excludes zero, `(+0.52 [−0.40, 1.44])` when it does not, and
    `(+0.52)` with one pair (no interval)."""
    if delta.interval is None:
        return f"({delta.mean:+.{decimals}f})".replace("-", "−")
    low, high = (f"{v:.{decimals}f}".replace("-", "−") for v in delta.interval)
    sign = ("↑" if delta.mean > 0 else "↓") if delta.resolved else ("+" if delta.mean >= 0 else "−")
    return f"({sign}{abs(delta.mean):.{decimals}f} [{low}, {high}])"


class Footnotes:
    """Numbered footnotes, one per distinct reason, listing the rows it applies to."""

    def __init__(self) -> None:
        self.notes: dict[str, list[int]] = {}

    def mark(self, reason: str, row: int) -> str:
        rows = self.notes.setdefault(reason, [])
        if row not in rows:
            rows.append(row)
        return str(list(self.notes).index(reason) + 1).translate(SUPERSCRIPT)

    def markdown(self) -> str:
        items = []
        for i, (reason, rows) in enumerate(self.notes.items(), 1):
            which = "row" if len(rows) == 1 else "rows"
            items.append(f"{i}. {markdown_text(reason)} (paper {which} {', '.join(map(str, rows))})")
        return "\n".join(items)


def _escape(text: str) -> str:
    """A table cell: one line, `|` kept from ending the cell, HTML shown as text."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def markdown_text(text: str) -> str:
    """Free text (a failure reason, an error) as Markdown text: besides `_escape`, the brackets of links and images
    escaped, so neither raw HTML, a `javascript:` link nor a remote image gets through (code spans stay)."""
    return _escape(re.sub(r"([\\\[\]])", r"\\\1", str(text)))


NOT_COMPARED = "this row ran with other settings than the paper's row: its paper values are not compared"


def _measured_cell(line: Line, m: Metric, spec: TableSpec, notes: Footnotes) -> str:
    value = line.values[m.name]
    if value is None:
        return DASH + notes.mark(line.reasons[m.name] or line.reason or "no value", line.row)
    text = _fmt(value, m, spec.decimals)
    std = line.std(m.name) if m.delta else None
    if std is not None:
        text += f" ±{std:.{spec.decimals}f}"
    delta = line.delta(m.name) if m.delta else None
    if delta is not None:
        text += " " + _measured_delta(delta, spec.decimals)
        if delta.resolved and (delta.mean > 0) == (m.better == "max"):
            text = f"**{text}**"
    return text


def _paper_cell(line: Line, m: Metric, spec: TableSpec, best: float | None, notes: Footnotes) -> str:
    value = line.paper_values[m.name]
    if line.changed_settings:
        return DASH + notes.mark(NOT_COMPARED, line.row)
    if value is None:
        return DASH
    text = _fmt(value, m, spec.decimals)
    base = line.baseline
    if m.delta and base is not None and base.paper_values[m.name] is not None:
        text += " " + _paper_delta(value, base.paper_values[m.name], spec.decimals)
    if best is not None and round(value, 6) == round(best, 6):
        text = f"**{text}**"
    return text


def scale_lines(meta: dict[str, Any], error: str | None, timing: bool = False) -> list[str]:
    """The block each report opens with: the scale the numbers were produced at (for a timing table, the
    machine they were timed on)."""
    if error:
        return [f"> **Scale:** unknown: {error}."]
    keys = TIMING_KEYS if timing else META_KEYS
    shown = [f"{k} `{meta[k]}`" for k in keys if meta.get(k) not in (None, "")]
    missing = [k for k in keys if meta.get(k) in (None, "") and not (timing and k == "gpu")]
    extra = [f"{k} `{v}`" for k, v in meta.items() if k not in keys and not isinstance(v, (dict, list))]
    out = ["> **Scale:** " + " · ".join(shown + extra)]
    if missing:
        out += [">", f"> Not recorded in the results: {', '.join(missing)}."]
    if timing:
        out += [">", "> Timed on the machine named above, not on the paper's hardware: compare NOAH's overhead (%) "
                "with the paper's, not frames/s."]
    elif meta.get("profile") != "imagenet":
        out += [">", f"> These numbers come from the `{meta.get('profile', 'unknown')}` profile, not from ImageNet "
                "at the paper's settings: a difference resolved here is a finding about this scale, not about the "
                "paper's."]
        if meta.get("departures"):
            out += [">", "> Departs from the paper's settings to fit its budget: " + "; ".join(meta["departures"])
                    + " (docs/fidelity.md, \"Scale\")."]
    return out


def evidence_lines(meta: dict[str, Any]) -> list[str]:
    """What the measured values can show: the dataset's chance level and the seeds behind every row."""
    chance, seeds = meta.get("chance") or {}, meta.get("seeds") or []
    out = []
    if chance.get("top1") is not None:
        extra = f", mAP {chance['map']:.2f}%" if chance.get("map") is not None else ""
        what = "a random ranking of" if "map" in chance else "guessing on"
        out += [f"> **Chance level:** top-1 {chance['top1']:.2f}%, top-5 {chance['top5']:.2f}%{extra} ({what} "
                f"{chance.get('images', '?')} evaluated images). A row whose top-1 a one-sided binomial test "
                "(95%, pooled over seeds) cannot tell from it carries a note."]
    if seeds:
        out += [">" if out else "", f"> **Seeds:** {', '.join(map(str, seeds))}. Values are means over a row's "
                "finished seeds (± their sample std); (Δ [low, high]) is the mean paired difference to the block's "
                "baseline with its Student-t 95% interval, marked ↑/↓ (bold when better) only when that interval "
                "excludes zero." + (" With one seed no interval exists: the signed differences are shown unmarked, and "
                           "none is a finding." if len(seeds) < 2 else "")]
    return [line for line in out if line]


def _network_cell(line: Line, notes: Footnotes) -> str:
    label = line.network + (f" [{', '.join(line.changed_settings)}]" if line.changed_settings else "")
    return _escape(label) + "".join(notes.mark(n, line.row) for n in line.notes)


def markdown(spec: TableSpec, results: Results, lines: list[Line]) -> str:
    """The table as the paper lays it out, with a paper column beside each measured metric."""
    notes = Footnotes()
    header = ["Network", *(s.label for s in spec.settings), *(["n"] if spec.seeded else [])]
    for m in spec.metrics:
        header += [m.label, f"{m.label} paper"] if m.paper else [m.label]
    scale = scale_lines(results.meta, results.error, timing=not spec.seeded)
    if spec.proxy:
        scale += [">", *proxy.banner(results.meta.get("profile", "proxy"))]
    evidence = evidence_lines(results.meta) if spec.seeded and not results.error else []
    out = [f"# {spec.heading}: {spec.title}", "", *scale, *([""] + evidence if evidence else []),
           "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    family = None
    lowest = {m.name: _clear_lowest(lines, m) for m in spec.metrics if m.interval}
    for block in _blocks(lines):
        best = {m.name: _best([ln.paper_values[m.name] for ln in block], m.better) for m in spec.metrics}
        for line in block:
            if spec.groups:
                current = backbone_family(line.paper["key"])
                if current != family:
                    family = current
                    out.append("| " + " | ".join([f"*{FAMILIES.get(family, family)}*"] + [""] * (len(header) - 1))
                               + " |")
            cells = [_network_cell(line, notes), *(_escape(s.show(line.paper)) for s in spec.settings),
                     *([str(line.n)] if spec.seeded else [])]
            for m in spec.metrics:
                cells.append(_measured_cell(line, m, spec, notes) if spec.seeded else
                             _timed_cell(line, m, spec, notes, lowest.get(m.name)))
                if m.paper:
                    cells.append(_paper_cell(line, m, spec, best[m.name], notes))
            out.append("| " + " | ".join(cells) + " |")
    out += ["", _legend(spec)]
    if spec.seeded and not results.error:
        out += ["", resolved_line(spec, lines)]
    if notes.notes:
        out += ["", "Notes (— marks a value we do not have):", "", notes.markdown()]
    if spec.proxy:
        out += ["", *proxy.markdown(list(paper_comparisons(lines).values()), spec.decimals)]
    return "\n".join(out) + "\n"


def paper_comparisons(lines: list[Line]) -> dict[int, proxy.Comparison]:
    """Per NOAH row (by row number) of a proxy table: its measured top-1 delta to its baseline beside the paper's
    delta for the same backbone; rows whose settings differ from the paper's are not compared."""
    out = {}
    for line in lines:
        base = line.baseline
        if base is None or line.changed_settings or base.changed_settings:
            continue
        paper, paper_base = line.paper_values.get("top1"), base.paper_values.get("top1")
        if paper is None or paper_base is None:
            continue
        delta = line.delta("top1")
        out[line.row] = proxy.Comparison(backbone_name(line.paper["key"]), paper - paper_base,
                                         delta.mean if delta else None, delta.interval if delta else None)
    return out


def resolved_line(spec: TableSpec, lines: list[Line]) -> str:
    """Which differences to a block's baseline this run resolves (95% interval excluding zero), whatever their
    direction, and how many it leaves unresolved: the findings of the table, stated once."""
    found, unresolved = [], 0
    for line in lines:
        for m in spec.metrics:
            delta = line.delta(m.name) if line.baseline is not None and line is not line.baseline else None
            if delta is None or m.kind in ("params", "params_m", "madds"):
                continue
            if delta.resolved:
                found.append(f"{_escape(line.name or str(line.row))} {m.label} {_measured_delta(delta, spec.decimals)}")
            else:
                unresolved += 1
    if not found and not unresolved:
        return "**Resolved differences:** none measured (no row shares a finished seed with its baseline)."
    return (f"**Resolved differences** (to the block's baseline, 95% interval excluding zero): "
            f"{'; '.join(found) or 'none'}; {unresolved} other difference(s) unresolved at these seeds.")


def _overhead_interval(line: Line, m: Metric) -> tuple[float, float] | None:
    low, high = (_number(line.result.get(f"{m.interval}_overhead_{end}")) for end in ("low", "high"))
    return None if low is None or high is None else (low, high)


def _clear_lowest(lines: list[Line], m: Metric) -> Line | None:
    """The row with the lowest overhead, when its 95% interval lies wholly below the next lowest's."""
    timed = sorted((ln for ln in lines if ln.values[m.name] is not None and _overhead_interval(ln, m)),
                   key=lambda ln: ln.values[m.name])
    if len(timed) < 2:
        return None
    return timed[0] if _overhead_interval(timed[0], m)[1] < _overhead_interval(timed[1], m)[0] else None


def _timed_cell(line: Line, m: Metric, spec: TableSpec, notes: Footnotes, lowest: Line | None) -> str:
    value = line.values[m.name]
    if value is None:
        return DASH + notes.mark(line.reasons[m.name] or "no value", line.row)
    text = _fmt(value, m, spec.decimals)
    interval = _overhead_interval(line, m) if m.interval else None
    if interval is None:
        return text
    text = (text + " [" + ", ".join(f"{v:.{spec.decimals}f}" for v in interval) + "]").replace("-", "−")
    if line.result.get(f"{m.interval}_resolved") is False:
        paper = line.paper_values[m.name]
        text += notes.mark(f"{m.interval.upper()} overhead: the 95% interval after "
                           f"{line.result.get(f'{m.interval}_rounds', '?')} timed rounds is not narrower than the "
                           f"paper's overhead ({'?' if paper is None else f'{paper:.2f}'}%), so it cannot confirm "
                           "or refute it", line.row)
    return f"**{text}**" if line is lowest else text


def _legend(spec: TableSpec) -> str:
    if not spec.seeded:
        return ("Overheads: the mean over timed rounds (baseline and NOAH in turns) with its Student-t 95% interval "
                "[low, high]; ours in **bold** only where the lowest interval lies wholly below the next lowest. "
                "Paper columns as the paper prints them, its lowest overhead in **bold**.")
    return ("Params and MAdds: the model at the paper's settings (" + spec.complexity_setting + "), comparable with "
            "the paper's; the trained model's own counts are the CSV's `trained_params` and `trained_madds`. "
            "Paper columns as the paper prints them (its best per block in **bold**, its deltas against the "
            "block's baseline); a row whose settings differ from the paper's row shows them in [brackets] and is "
            "not compared with the paper.")


def _timed_columns(spec: TableSpec) -> list[str]:
    """A timed table's interval columns, as the benchmark writes them (`resolved` as 1 or 0 here)."""
    return [f"{m.interval}_{c}" for m in spec.metrics if m.interval
            for c in ("overhead_low", "overhead_high", "rounds", "resolved")]


def csv_columns(spec: TableSpec) -> list[str]:
    """Tidy columns: identity (the paper's row number, the row's name in params.yaml, network), the paper CSV's
    setting columns, measured metrics (with, for trained tables, `n` and each compared metric's std and paired
    interval), `paper_*`, status."""
    skip = {"row", "key", "head"} | {m.paper for m in spec.metrics}
    settings = [c for c in paper_rows(spec)[0] if c not in skip]
    stats = [f"{m.name}_{s}" for m in spec.metrics if m.delta and spec.seeded
             for s in ("std", "delta", "delta_low", "delta_high")]
    trained = ["trained_params", "trained_madds", "edited", "above_chance"] if spec.seeded else []
    timed = _timed_columns(spec)
    return ["row", "name", "network", "key", *(["head"] if not spec.groups else []), *settings, "backbone",
            *(["n"] if spec.seeded else []), *(m.name for m in spec.metrics), *stats,
            *timed, *(f"paper_{m.name}" for m in spec.metrics if m.paper), *(proxy.COLUMNS if spec.proxy else ()),
            *trained, "status", "reason", "run_id", "trial_id"]


def _plain(value: float | None, m: Metric | None = None) -> str:
    if value is None:
        return ""
    if m is not None and m.kind in ("params", "madds"):
        return str(int(round(value)))
    return f"{value:.10g}"


def _joined(line: Line, suffix: str) -> str:
    """The runs' `run_id`s (`scratch_run_id;finetune_run_id` for a row trained more than once), seed by seed."""
    items = line.runs or [line.result]
    return ";".join(str(v) for run in items for k, v in run.items() if k.endswith(suffix) and v)


def table_csv(spec: TableSpec, lines: list[Line]) -> str:
    """The tidy CSV of a report table: one record per paper row (`csv_columns`)."""
    columns = csv_columns(spec)
    records = []
    compared = paper_comparisons(lines) if spec.proxy else {}
    for line in lines:
        record: dict[str, Any] = {c: line.paper.get(c, "") for c in columns}
        record.update(row=line.row, name=line.name or "", network=line.network, status=line.status,
                      reason="; ".join(filter(None, [line.reason, *line.changed_settings, *line.notes])),
                      backbone=line.result.get("backbone") or line.result.get("key") or "",
                      run_id=_joined(line, "run_id"), trial_id=_joined(line, "trial_id"))
        record.update({c: _plain(_number(line.result.get(c))) for c in _timed_columns(spec)})
        if spec.seeded:
            record.update(n=line.n, trained_params=line.trained.get("params", ""),
                          trained_madds=line.trained.get("madds", ""), edited="; ".join(line.changed_settings),
                          above_chance="" if line.above_chance is None else str(line.above_chance).lower())
        for m in spec.metrics:
            record[m.name] = _plain(line.values[m.name], m)
            if m.paper:
                record[f"paper_{m.name}"] = "" if line.changed_settings else _plain(line.paper_values[m.name], m)
            if m.delta and spec.seeded:
                delta = line.delta(m.name)
                low, high = delta.interval if delta is not None and delta.interval else (None, None)
                record.update({f"{m.name}_std": _plain(line.std(m.name)),
                               f"{m.name}_delta": _plain(delta.mean if delta else None),
                               f"{m.name}_delta_low": _plain(low), f"{m.name}_delta_high": _plain(high)})
        if spec.proxy:
            record.update(compared[line.row].record() if line.row in compared else dict.fromkeys(proxy.COLUMNS, ""))
        records.append(record)
    return csv_text(records, columns)
