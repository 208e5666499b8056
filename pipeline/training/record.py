"""A trial's record on disk: its checkpoint folder (`<checkpoint_root>/<trial_id>/`) and the files in it.

The folder holds `last.pt` (the checkpoint after the last finished epoch), `config.yaml` (the trial as it
ran), `result.json` (its final metrics, once finished), `mlflow_run_id` (the run it logs to) and `lock` (held
by the process training it, `trial_lock`). Every file is written atomically. Once the trial has FINISHED,
`compact` rewrites `last.pt` as its final weights only: the optimizer and EMA state that resuming needs are two
to three times the model's size, and nothing reads them after the last epoch (fine-tuning and the report read
`model`). A checkpoint starts with a header
holding its payload's length and SHA-256 and records its trial id: one that is damaged or another trial's is
set aside (`last.pt.rejected-<n>`), never trained on.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import sys
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import SHARED_ROOT
from ..utils.io import atomic_write, atomic_write_text

CHECKPOINT = "last.pt"
CHECKPOINT_MAGIC = b"noah-pipeline checkpoint v1\n"
"""The first line of every checkpoint file; the second holds the payload's length and SHA-256."""
CONFIG = "config.yaml"
RESULT = "result.json"
RUN_ID_FILE = "mlflow_run_id"
LOCK = "lock"
RESUME_KEYS = ("optimizer", "ema")
"""What only resuming an unfinished trial reads; a finished trial's compacted checkpoint holds the rest."""


def checkpoint_root(root: str | Path) -> Path:
    """`train.checkpoint_root` as an absolute folder: a relative root is taken from SHARED_ROOT (the repository
    root, also in DVC's experiment workspaces), since Ray may change the working folder and every experiment
    of the repository shares the trials."""
    return (SHARED_ROOT / root).absolute()


def trial_folder(root: str | Path, tid: str) -> Path:
    """Trial `tid`'s folder under the checkpoint root `root`."""
    return checkpoint_root(root) / tid


def checkpoint_of(root: str | Path, tid: str) -> Path:
    """Trial `tid`'s last checkpoint under the checkpoint root `root`."""
    return trial_folder(root, tid) / CHECKPOINT


@contextlib.contextmanager
def trial_lock(folder: Path, label: str, wait: bool = True) -> Iterator[bool]:
    """Hold the trial folder's lock while training it. Experiments run side by side (`dvc queue start -j 2`)
    share the checkpoint root, and two that need the same unfinished trial would write one checkpoint and one
    MLflow run at once: the second waits here, then finds the trial FINISHED and reuses it. The lock is the
    kernel's (flock), so a process that dies releases it. Yields whether it is held: without `wait`, False
    at once while another process holds it (a live process is training the trial)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            print(f"waiting for {label}: another process is training it ({folder})", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield True


def read_run_id(folder: Path) -> str | None:
    """The id of the MLflow run the trial in `folder` trains into, None before it has one."""
    path = folder / RUN_ID_FILE
    return (path.read_text().strip() or None) if path.is_file() else None


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    """`config.yaml`: the trial as it ran (what the report rebuilds its model from)."""
    atomic_write_text(folder / CONFIG, yaml.safe_dump(config, sort_keys=False))
    return folder / CONFIG


def read_config(path: Path) -> dict[str, Any]:
    """A `config.yaml` file written by `write_config`."""
    return yaml.safe_load(path.read_text()) or {}


def write_result(folder: Path, result: dict[str, Any]) -> None:
    atomic_write_text(folder / RESULT, json.dumps(result))


def read_result(folder: Path) -> dict[str, Any]:
    """The final metrics a finished trial wrote (FileNotFoundError when it has not finished)."""
    return json.loads((folder / RESULT).read_text())


def clear(folder: Path) -> None:
    """Forget a trial's progress (`--retrain`): its checkpoint, result and run id."""
    for name in (CHECKPOINT, RESULT, RUN_ID_FILE):
        (folder / name).unlink(missing_ok=True)


class CheckpointError(ValueError):
    """A checkpoint that is damaged (truncated, bytes changed), not the trainer's, unsafe to load, or another
    trial's: never trained on."""


def _encode(state: dict[str, Any]) -> tuple[bytes, memoryview]:
    """A checkpoint file's two parts: a header line with the payload's length and SHA-256, then torch.save's
    bytes, so that `load_checkpoint` can tell a damaged file from a good one (kept apart: no copy of the
    payload)."""
    buffer = BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    return CHECKPOINT_MAGIC + f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode(), payload


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """One atomic file (never half written), in `_encode`'s format."""
    parts = _encode(state)
    atomic_write(path, lambda f: f.writelines(parts))


def compact(folder: Path, tid: str, dry_run: bool = False) -> int:
    """Rewrite a FINISHED trial's checkpoint as its final weights (and epoch, history, trial id), atomically;
    returns the bytes this frees (0 when it holds no resume state or is absent; `dry_run` writes nothing).
    Only for a finished trial: an unfinished one could no longer resume. CheckpointError when damaged."""
    path = folder / CHECKPOINT
    state = load_checkpoint(path, tid)
    if state is None or not set(RESUME_KEYS) & state.keys():
        return 0
    parts = _encode({key: value for key, value in state.items() if key not in RESUME_KEYS})
    freed = path.stat().st_size - sum(len(part) for part in parts)
    if not dry_run:
        atomic_write(path, lambda f: f.writelines(parts))
    return freed


def load_checkpoint(path: str | Path, trial_id: str | None = None) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None if there is none; tensors and plain data only (weights_only=True).

    Raises CheckpointError when its header, length or hash does not match its bytes, when it holds more than
    weights_only allows, or when it is not trial `trial_id`'s (when given)."""
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    end = data.find(b"\n", len(CHECKPOINT_MAGIC))
    fields = data[len(CHECKPOINT_MAGIC):end].split() if data.startswith(CHECKPOINT_MAGIC) and end > 0 else []
    if len(fields) != 2 or not fields[0].isdigit():
        raise CheckpointError(f"{path}: not a trainer checkpoint (no valid header)")
    payload, length = memoryview(data)[end + 1:], int(fields[0])
    if len(payload) != length:
        raise CheckpointError(f"{path}: truncated or extended ({len(payload)} bytes after the header, not {length})")
    if hashlib.sha256(payload).hexdigest().encode() != fields[1]:
        raise CheckpointError(f"{path}: damaged (its SHA-256 differs from the one its header records)")
    try:
        state = torch.load(BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be loaded safely: {err}") from err
    if trial_id is not None and state.get("trial_id") != trial_id:
        raise CheckpointError(f"{path}: belongs to trial {state.get('trial_id')}, not {trial_id}")
    return state


def set_aside(path: Path) -> Path:
    """Move a rejected checkpoint to the first free `<name>.rejected-<n>` beside it: kept for a look, never
    loaded again."""
    n = 1
    while path.with_name(f"{path.name}.rejected-{n}").exists():
        n += 1
    return path.rename(path.with_name(f"{path.name}.rejected-{n}"))


def reject_bad_checkpoint(folder: Path, tid: str) -> str | None:
    """Set aside the folder's checkpoint if it is damaged or another trial's, so the trial starts from
    scratch; returns why (None: it is good or absent). Run once by the driver, before any worker loads it."""
    path = folder / CHECKPOINT
    try:
        load_checkpoint(path, tid)
    except CheckpointError as err:
        return f"{err}; moved to {set_aside(path).name}"
    return None
