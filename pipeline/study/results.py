"""A table's results files: `results/<table>.json` (meta + one row per printed row, each trial's outcome
read back from MLflow, per seed) and the same flattened to one line per row and seed in `results/<table>.csv`;
under results/study/ for the tables of `study.tables`, the study stage's out folder (`config.results_dir`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import flatten, to_dict
from ..training.tracking import latest_run, result_of
from ..utils.io import atomic_write_text, csv_text
from .rows import RowTrials


def row_result(rt: RowTrials, keys: dict[tuple[str, int], str], uri: str, errors: dict[str, str]) -> dict[str, Any]:
    """A results row: the head, the table's setting, and per seed (`runs`) each trial's outcome read back from
    MLflow (or the error Ray saw, for a trial that failed before its run existed)."""
    head = rt.row.head
    setting = {"N": head.N, "r": head.r, **head.options()}
    runs: dict[int, dict[str, Any]] = {}
    for (kind, seed), key in keys.items():
        run = latest_run(key, uri)
        if run is None:
            res = {"status": "MISSING", "reason": errors.get(key, "no run was recorded for this trial")}
        else:
            res = result_of(run)
            if res["status"] != "FINISHED" and not res.get("reason"):
                res["reason"] = errors.get(key, f"run ended {res['status']}")
        prefix = kind_prefix(kind)
        runs.setdefault(seed, {"seed": seed}).update({f"{prefix}{k}": v for k, v in res.items()})
    return {"row": rt.row.row, "name": rt.row.name, "backbone": rt.row.backbone, "head": to_dict(head),
            "head_name": head.name, "setting": setting, "runs": list(runs.values())}


def kind_prefix(kind: str) -> str:
    """The prefix of a trial kind's keys in a results row: none for `classify`, else `scratch_`, `finetune_`."""
    return "" if kind == "classify" else f"{kind}_"


def unfinished(rows: list[dict[str, Any]]) -> list[str]:
    """`row N (name) seed S: reason` for each trial of `rows` that ended without a result (a diverged trial
    included)."""
    out = []
    for row in rows:
        for run in row["runs"]:
            for prefix in ("", "scratch_", "finetune_"):
                status, reason = run.get(f"{prefix}status"), run.get(f"{prefix}reason") or ""
                if status is not None and status != "FINISHED":
                    kind = " " + prefix.rstrip("_") if prefix else ""
                    out.append(f"row {row['row']} ({row['name']}){kind} seed {run['seed']}: {reason}")
    return out


def write_results(out_dir: Path, table: str, results: dict[str, Any]) -> None:
    """`<table>.json` (meta + rows) and `<table>.csv` (one line per row and seed), each written atomically."""
    atomic_write_text(out_dir / f"{table}.json", json.dumps(results, indent=2, default=str) + "\n")
    rows = [flatten({**{k: v for k, v in r.items() if k != "runs"}, **run})
            for r in results["rows"] for run in r["runs"]]
    atomic_write_text(out_dir / f"{table}.csv", csv_text(rows, list(dict.fromkeys(k for r in rows for k in r))))
