"""`python -m pipeline clean [--dry-run]`: free the checkpoint space that no resume and no later stage needs.

Under `train.checkpoint_root`, one folder per trial (`training.record`). The study applies the same rules to
the trials it has just run (`sweep.run_study`), so a study leaves only what resume and fine-tuning need;
the command also clears what older studies and single `train` runs left. What goes:
- every `last.pt.rejected-<n>` (a damaged or foreign checkpoint set aside, never loaded again);
- a FINISHED trial's checkpoint, unless a fine-tuning trial of a configured table starts from it (Table 9's
  classification trials, whose checkpoints also hold the report's attention figure rows): its result,
  config and run id stay, and MLflow still finds it FINISHED, so no stage trains it again;
- the optimizer and EMA state of a kept FINISHED trial's checkpoint (weights only, `record.compact`).
What stays: the checkpoint of a trial with a RUNNING run or with no FINISHED run (an interrupted trial
resumes from it), and every checkpoint when some source's data is not prepared (its identity, and so which
folder it is, is unknown). Each removal is printed with the bytes it frees; `--dry-run` removes nothing.
"""
from __future__ import annotations

import argparse
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from ..config import PARAMS, Params, load_params
from ..training.record import CHECKPOINT, checkpoint_root, compact
from ..training.tracking import check_store, find_finished, find_running, resolve_uri
from ..training.trial import trial_key
from ..utils.io import require_writable
from .rows import study_trials, table_order, table_rows

UNPREPARED = "unprepared-"


@dataclass(frozen=True)
class Removal:
    """One thing `clean` removes: a file, or (`compact`) a checkpoint's resume state."""

    path: Path
    why: str
    bytes: int
    compact: bool = False


def needed_sources(params: Params) -> set[str] | None:
    """Trial ids a fine-tuning trial of any table the active profile trains starts from; None when one is not
    known (its data is not prepared), so that nothing finished is removed."""
    runnable = [name for name in params.tables_of()  # a reid table needs the profile's reid data
                if params.tables[name].task != "reid" or params.active.reid_dataset is not None]
    rows = {name: table_rows(params, name) for name in sorted(runnable, key=table_order)}
    keys = {trial_key(st.trial.init_from) for st in study_trials(rows, frozenset()).values()
            if st.trial.init_from is not None}
    return None if any(key.startswith(UNPREPARED) for key in keys) else keys


def _trial_removals(folder: Path, uri: str, needed: set[str] | None) -> list[Removal]:
    """What goes from one trial's folder (see the module doc)."""
    tid = folder.name
    out = [Removal(path, "rejected checkpoint", path.stat().st_size)
           for path in sorted(folder.glob(f"{CHECKPOINT}.rejected-*"))]
    checkpoint = folder / CHECKPOINT
    if not checkpoint.is_file() or find_running(tid, uri) is not None or find_finished(tid, uri) is None:
        return out
    if needed is not None and tid not in needed:
        return [*out, Removal(checkpoint, "finished, no fine-tuning starts from it", checkpoint.stat().st_size)]
    freed = compact(folder, tid, dry_run=True)
    return [*out, Removal(checkpoint, "finished: optimizer and EMA state", freed, compact=True)] if freed else out


def plan_clean(root: Path, uri: str, needed: set[str] | None, only: Collection[str] | None = None) -> list[Removal]:
    """Everything `clean` would remove under the checkpoint root `root` (in the folders of the trial ids
    `only`, when given), nothing removed."""
    if not root.is_dir():
        return []
    return [r for folder in sorted(p for p in root.iterdir() if p.is_dir() and (only is None or p.name in only))
            for r in _removals_if_present(folder, uri, needed)]


def _removals_if_present(folder: Path, uri: str, needed: set[str] | None) -> list[Removal]:
    """`_trial_removals`, or nothing when a file vanishes while it looks: another study or `dvc exp` workspace
    sharing the checkpoint root cleaned the same folder first."""
    try:
        return _trial_removals(folder, uri, needed)
    except FileNotFoundError:
        return []


def apply(removals: list[Removal]) -> None:
    """Remove what `plan_clean` listed (a compacted checkpoint is rewritten atomically, weights only)."""
    for r in removals:
        if r.compact:
            compact(r.path.parent, r.path.parent.name)
        else:
            r.path.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params or PARAMS)
    root = checkpoint_root(params.train.checkpoint_root)
    require_writable(root, "train.checkpoint_root")
    check_store(params.mlflow.tracking_uri, "mlflow.tracking_uri")
    removals = plan_clean(root, resolve_uri(params.mlflow.tracking_uri), needed_sources(params))
    for r in removals:
        print(f"{'would remove' if args.dry_run else 'remove'} {r.path} ({r.why}): {r.bytes / 1e6:.1f} MB")
    if not args.dry_run:
        apply(removals)
    total = sum(r.bytes for r in removals)
    print(f"{'would free' if args.dry_run else 'freed'} {total / 1e6:.1f} MB in {len(removals)} removals under {root}")
    return 0
