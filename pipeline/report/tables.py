"""One report table: the paper's rows joined with a results file, rendered as Markdown and as a tidy CSV.

Rows always come from the paper (never dropped, never reordered); a row the results lack, a failed trial or an
unreadable results file becomes "—" with the reason in a footnote, so a partial study still reads correctly.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils.io import csv_text
from .specs import FAMILIES, Metric, PaperRow, TableSpec, backbones, guess_notes, is_baseline, paper_rows

DASH = "—"
SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
META_KEYS = ("dataset", "num_classes", "img_size", "epochs", "profile", "commit", "date")
TIMING_KEYS = ("img_size", "cpu", "gpu", "commit", "date")  # Table 10 times random inputs: no dataset


@dataclass
class Results:
    """A results file as read: its meta, its rows by paper row number, or why it could not be used."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    rows: dict[int, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None


def load_results(path: Path, spec: TableSpec) -> Results:
    """Read `results/<table>.json`; a missing or malformed file gives an `error`, never an exception."""
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
            if number is None and key in keyed:
                number = keyed[key]["row"]
            res.rows[int(number)] = item
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        res.meta, res.rows = {}, {}
        res.error = f"{res.path.name} could not be read ({type(err).__name__}: {err})"
    return res


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class Line:
    """One paper row with its measured values (None where there is none) and why a value is missing."""

    paper: PaperRow
    network: str
    status: str
    reason: str | None
    result: dict[str, Any]
    values: dict[str, float | None]
    paper_values: dict[str, float | None]
    notes: list[str] = field(default_factory=list)
    reasons: dict[str, str | None] = field(default_factory=dict)  # per metric: why it has no value
    baseline: Line | None = None

    @property
    def row(self) -> int:
        return int(self.paper["row"])


def _paper_value(row: PaperRow, m: Metric) -> float | None:
    text = row.get(m.paper, "")
    return float(text) * m.scale if text else None


def _deviations(spec: TableSpec, row: PaperRow, result: dict[str, Any]) -> list[str]:
    """Where the measured trial differs from the paper's row (e.g. a smaller backbone in a smoke profile)."""
    notes = []
    backbone = result.get("backbone") or result.get("key")
    if backbone and backbone != row["key"]:
        notes.append(f"measured with `{backbone}` in place of `{row['key']}`")
    setting = result.get("setting") or {}
    for column, value in setting.items():
        column = column.removeprefix("head.")
        paper = row.get(column)
        if paper is None or value is None or paper == "":
            continue
        try:
            same = float(paper) == float(value)
        except (TypeError, ValueError):
            same = str(paper) == str(value)
        if not same:
            notes.append(f"ran with {column}={value} (paper: {paper})")
    return notes


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


def build_lines(spec: TableSpec, results: Results) -> list[Line]:
    """The paper's rows in order, each joined with its result and linked to its block's baseline row."""
    lines: list[Line] = []
    baselines: dict[str, Line] = {}
    for row in paper_rows(spec):
        result = results.rows.get(int(row["row"])) or {}
        if results.error:
            outcomes = {"": ("MISSING", results.error)}
        elif not result:
            outcomes = {"": ("MISSING", f"no result for this row in {results.path.name}")}
        else:
            outcomes = _outcomes(result)
        status, reason = _overall(outcomes)
        values, reasons = {}, {}
        for m in spec.metrics:
            m_status, reasons[m.name] = _metric_outcome(outcomes, m.name)
            value = result.get(m.source or m.name)
            values[m.name] = _number(value) if m_status == "FINISHED" or not m.trained else None
            if values[m.name] is None and reasons[m.name] is None:
                reasons[m.name] = f"{results.path.name} holds no value for this column of a {m_status} trial"
        line = Line(row, spec.network(row), status, reason, result, values,
                    {m.name: _paper_value(row, m) for m in spec.metrics},
                    _deviations(spec, row, result) + guess_notes(spec, row), reasons)
        if is_baseline(row):
            baselines[row["key"]] = line
        else:
            line.baseline = baselines.get(row["key"])
        lines.append(line)
    return lines


def _blocks(lines: list[Line]) -> list[list[Line]]:
    """Runs of rows that share a baseline: the unit within which the best value is bolded."""
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


def _delta(value: float, base: float, decimals: int) -> str:
    diff = round(value - base, decimals)
    arrow = "↑" if diff > 0 else "↓" if diff < 0 else "±"
    return f"({arrow}{abs(diff):.{decimals}f})"


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
            items.append(f"{i}. {_escape(reason)} (paper {which} {', '.join(map(str, rows))})")
        return "\n".join(items)


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _cell(line: Line, m: Metric, spec: TableSpec, paper: bool, best: float | None, notes: Footnotes) -> str:
    values = line.paper_values if paper else line.values
    value = values[m.name]
    if value is None:
        if paper:
            return DASH
        reason = line.reasons[m.name] or line.reason or "no value"
        return DASH + notes.mark(reason, line.row)
    text = _fmt(value, m, spec.decimals)
    base = line.baseline
    if m.delta and base is not None:
        base_value = (base.paper_values if paper else base.values)[m.name]
        if base_value is not None:
            text += " " + _delta(value, base_value, spec.decimals)
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
                "at the paper's settings: compare trends with the paper, not values."]
    return out


def markdown(spec: TableSpec, results: Results, lines: list[Line]) -> str:
    """The table as the paper lays it out, with a paper column beside each measured metric."""
    notes = Footnotes()
    header = ["Network", *(s.label for s in spec.settings)]
    for m in spec.metrics:
        header += [m.label, f"{m.label} paper"] if m.paper else [m.label]
    scale = scale_lines(results.meta, results.error, timing=spec.producer == "benchmark")
    out = [f"# {spec.name.replace('table', 'Table ')}: {spec.title}", "", *scale,
           "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    family = None
    for block in _blocks(lines):
        best = {(m.name, p): _best([(ln.paper_values if p else ln.values)[m.name] for ln in block], m.better)
                for m in spec.metrics for p in (False, True)}
        for line in block:
            if spec.groups:
                current = backbones()[line.paper["key"]]["family"]
                if current != family:
                    family = current
                    out.append("| " + " | ".join([f"*{FAMILIES.get(family, family)}*"] + [""] * (len(header) - 1))
                               + " |")
            name = _escape(line.network) + "".join(notes.mark(n, line.row) for n in line.notes)
            cells = [name, *(_escape(s.show(line.paper)) for s in spec.settings)]
            for m in spec.metrics:
                cells.append(_cell(line, m, spec, False, best[m.name, False], notes))
                if m.paper:
                    cells.append(_cell(line, m, spec, True, best[m.name, True], notes))
            out.append("| " + " | ".join(cells) + " |")
    bolding = ("the lowest overhead" if spec.groups else
               "the best measured and the best paper value per column within each baseline's block")
    out += ["", f"In **bold**: {bolding}." + ("" if spec.groups else
            " Deltas (↑/↓) are against the block's baseline row, for our values and the paper's alike.")]
    if notes.notes:
        out += ["", "Notes (— marks a value we do not have):", "", notes.markdown()]
    return "\n".join(out) + "\n"


def csv_columns(spec: TableSpec) -> list[str]:
    """Tidy columns: identity, the paper CSV's setting columns, measured metrics, `paper_*`, status."""
    skip = {"row", "key", "head"} | {m.paper for m in spec.metrics}
    settings = [c for c in paper_rows(spec)[0] if c not in skip]
    return ["row", "network", "key", *(["head"] if not spec.groups else []), *settings, "backbone",
            *(m.name for m in spec.metrics), *(f"paper_{m.name}" for m in spec.metrics if m.paper),
            "status", "reason", "run_id", "trial_id"]


def _plain(value: float | None, m: Metric) -> str:
    if value is None:
        return ""
    if m.kind in ("params", "madds"):
        return str(int(round(value)))
    return f"{value:.10g}"


def _joined(result: dict[str, Any], suffix: str) -> str:
    """`run_id`, or `scratch_run_id;finetune_run_id` for a row trained more than once."""
    return ";".join(str(v) for k, v in result.items() if k.endswith(suffix) and v)


def table_csv(spec: TableSpec, lines: list[Line]) -> str:
    """The tidy CSV of a report table: one record per paper row (`csv_columns`)."""
    columns = csv_columns(spec)
    records = []
    for line in lines:
        record: dict[str, Any] = {c: line.paper.get(c, "") for c in columns}
        record.update(row=line.row, network=line.network, status=line.status,
                      reason="; ".join(filter(None, [line.reason, *line.notes])),
                      backbone=line.result.get("backbone") or line.result.get("key") or "",
                      run_id=_joined(line.result, "run_id"), trial_id=_joined(line.result, "trial_id"))
        for m in spec.metrics:
            record[m.name] = _plain(line.values[m.name], m)
            if m.paper:
                record[f"paper_{m.name}"] = _plain(line.paper_values[m.name], m)
        records.append(record)
    return csv_text(records, columns)
