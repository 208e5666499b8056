"""The small files DVC compares across commits and experiments, keyed by each row's name in params.yaml
(`tables.<table>.rows.<name>`; Table 10's rows are its backbones):

- `metrics/<table>.json` for `dvc metrics show/diff` and `dvc exp show`: under the table's name (so that DVC's
  columns read `table7.max.top1`, not `reports/metrics/table7.json:max.top1`), per row, the trained metrics the
  paper prints (top-1 and top-5; Table 9 its scratch and fine-tuned top-1 and mAP) as the report shows them,
  and once the study has several seeds, `n` (finished seeds) and each metric's sample std; Table 10 per
  backbone, NOAH's overhead (%) on each device timed.
- `plots/curves/<table>.csv` for `dvc plots show/diff`: validation top-1 per epoch of every row (mean over its
  finished seeds; Table 9's two trainings as `<name> scratch` and `<name> finetune`), read from MLflow.
- `plots/top1/<table>.csv`: each row's top-1 beside the paper's.

A table with nothing to show has no file, and a file of a table no longer shown is removed, so each folder
holds exactly what this report found.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from ..utils.io import atomic_write_text, csv_text
from ..utils.stats import mean
from .figures import VAL_KEYS, metric_history, open_store
from .render import Line, Results
from .specs import TABLES, TableSpec

METRICS, CURVES, TOP1 = Path("metrics"), Path("plots") / "curves", Path("plots") / "top1"
DIGITS = 4


def _value(value: float | None) -> float | None:
    return None if value is None else round(value, DIGITS)


def row_metrics(spec: TableSpec, line: Line, seeds: int) -> dict[str, float | int]:
    """One row's summary: the values a paper column compares (a timed table's overheads), with `n` and the
    std of each when there are several seeds."""
    out: dict[str, float | int] = {}
    for m in spec.metrics:
        if not ((m.trained and m.paper) if spec.seeded else m.interval):
            continue
        out[m.name] = _value(line.values[m.name])
        if spec.seeded and seeds > 1:
            out[f"{m.name}_std"] = _value(line.std(m.name))
    if spec.seeded and seeds > 1:
        out["n"] = line.n
    return {k: v for k, v in out.items() if v is not None}


def table_metrics(spec: TableSpec, results: Results, lines: list[Line]) -> dict[str, dict[str, float | int]]:
    """`{row name: row_metrics}` of every named row."""
    seeds = len(results.meta.get("seeds") or [])
    return {line.name: row_metrics(spec, line, seeds) for line in lines if line.name}


def top1_points(spec: TableSpec, lines: list[Line]) -> list[dict[str, Any]]:
    """`{row: "<name> (ours)" | "<name> (paper)", top1}` per named row of a table with a top-1 column; no paper
    bar for a row that ran with other settings than the paper's."""
    if not spec.seeded or "top1" not in {m.name for m in spec.metrics}:
        return []
    out = []
    for line in lines:
        if not line.name:
            continue
        paper = None if line.changed_settings else line.paper_values["top1"]
        for who, value in (("ours", line.values["top1"]), ("paper", paper)):
            if value is not None:
                out.append({"row": f"{line.name} ({who})", "top1": _value(value)})
    return out


def curve_points(client: Any, lines: list[Line]) -> list[dict[str, Any]]:
    """`{row, epoch, val_top1}`: per named row (and trial kind) and epoch, the mean validation top-1 over the
    seeds whose trial finished."""
    per_epoch: dict[tuple[str, float], list[float]] = defaultdict(list)
    for line in lines:
        for run in line.runs if line.name else []:
            for key, run_id in run.items():
                kind = key.removesuffix("run_id")
                if key == kind or not run_id or run.get(f"{kind}status") != "FINISHED":
                    continue
                label = f"{line.name} {kind.rstrip('_')}".strip()
                for epoch, value in zip(*metric_history(client, run_id, VAL_KEYS)):
                    per_epoch[label, epoch].append(value)
    return [{"row": label, "epoch": int(epoch), "val_top1": _value(mean(values))}
            for (label, epoch), values in per_epoch.items()]


def write_summaries(built: dict[str, tuple[Results, list[Line]]], out_dir: Path, tracking_uri: str | None) -> str:
    """Write every table's metrics and plot data under `out_dir`; returns a line saying what was written."""
    client, missing = open_store(tracking_uri)
    written: dict[Path, set[str]] = {METRICS: set(), CURVES: set(), TOP1: set()}
    unread = []
    for name, (results, lines) in built.items():
        spec = TABLES[name]
        metrics = table_metrics(spec, results, lines)
        if metrics:
            atomic_write_text(out_dir / METRICS / f"{name}.json", json.dumps({name: metrics}, indent=1) + "\n")
            written[METRICS].add(f"{name}.json")
        points = top1_points(spec, lines)
        if points:
            atomic_write_text(out_dir / TOP1 / f"{name}.csv", csv_text(points, ["row", "top1"]))
            written[TOP1].add(f"{name}.csv")
        try:
            curves = curve_points(client, lines) if client is not None and spec.seeded else []
        except (MlflowException, OSError) as err:
            unread.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0]}")
            curves = []
        if curves:
            atomic_write_text(out_dir / CURVES / f"{name}.csv", csv_text(curves, ["row", "epoch", "val_top1"]))
            written[CURVES].add(f"{name}.csv")
    for folder, names in written.items():
        (out_dir / folder).mkdir(parents=True, exist_ok=True)  # DVC outs, even when empty
        for stale in (out_dir / folder).glob("table*.*"):
            if stale.name not in names:
                stale.unlink()
    why = missing if client is None else "; ".join(unread)
    return (f"metrics of {len(written[METRICS])} tables, learning curves of {len(written[CURVES])}, top-1 beside "
            f"the paper's of {len(written[TOP1])}" + (f" (no curves: {why})" if why else ""))
