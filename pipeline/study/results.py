"""A table's results files: `results/<table>.json` (meta + one row per printed row, each trial's outcome
read back from MLflow) and the same rows flattened in `results/<table>.csv`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import flatten, to_dict
from ..training.tracking import latest_run, result_of
from ..utils.io import atomic_write_text, csv_text
from .tables import RowTrials


def row_result(rt: RowTrials, keys: dict[str, str], uri: str, errors: dict[str, str]) -> dict[str, Any]:
    """A results row: the head, the table's setting, and each trial's outcome read back from MLflow (or the
    error Ray saw, for a trial that failed before its run existed)."""
    head = rt.row.head
    setting = {"N": head.N, "r": head.r, **head.options()}
    out: dict[str, Any] = {"row": rt.row.row, "backbone": rt.row.backbone, "head": to_dict(head),
                           "head_name": rt.row.head.name, "setting": setting}
    for kind, key in keys.items():
        run = latest_run(key, uri)
        if run is None:
            res = {"status": "MISSING", "reason": errors.get(key, "no run was recorded for this trial")}
        else:
            res = result_of(run)
            if res["status"] != "FINISHED" and not res.get("reason"):
                res["reason"] = errors.get(key, f"run ended {res['status']}")
        prefix = "" if kind == "classify" else f"{kind}_"
        out.update({f"{prefix}{k}": v for k, v in res.items()})
    return out


def unfinished(rows: list[dict[str, Any]]) -> list[str]:
    """`row N: reason` for each trial of `rows` that ended without a result (a diverged trial included)."""
    out = []
    for row in rows:
        for prefix in ("", "scratch_", "finetune_"):
            status, reason = row.get(f"{prefix}status"), row.get(f"{prefix}reason") or ""
            if status is not None and status != "FINISHED":
                out.append(f"row {row['row']}{' ' + prefix.rstrip('_') if prefix else ''}: {reason}")
    return out


def write_results(out_dir: Path, table: str, results: dict[str, Any]) -> None:
    """`<table>.json` (meta + rows) and `<table>.csv` (rows flattened), each written atomically."""
    atomic_write_text(out_dir / f"{table}.json", json.dumps(results, indent=2, default=str) + "\n")
    rows = [flatten(r) for r in results["rows"]]
    atomic_write_text(out_dir / f"{table}.csv", csv_text(rows, list(dict.fromkeys(k for r in rows for k in r))))
