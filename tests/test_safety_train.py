"""Safety of a trial's state, through `run_trial` and `python -m pipeline train` with real resnet18 trials at
32 px on `tiny_data`: a checkpoint is resumed only if it is intact and its trial's (else it is set aside and
the trial starts over in a new run), a full disk is named as such, SIGTERM ends the run KILLED, a deleted
experiment is restored, written files respect the umask, and the report skips a damaged checkpoint."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from pipeline import REPO_ROOT
from pipeline.config import BuiltinDataConfig, MlflowConfig, PrepareConfig, TrainConfig, load_params
from pipeline.data.prepare import prepare
from pipeline.report import build_reports
from pipeline.training.record import (
    CHECKPOINT,
    LOCK,
    RESULT,
    RUN_ID_FILE,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.training.run import run_trial
from pipeline.training.trial import Trial, resolve_trial

pytestmark = pytest.mark.slow

QUIET = TrainConfig(progress="off")


RECIPES = load_params().recipes


def _trial(data: Path, **changes: Any) -> Trial:
    return resolve_trial({"backbone": "resnet18", "head": {"kind": "baseline"}, "recipe": "resnet",
                          "data_dir": str(data), "img_size": 32, "epochs": 1, "batch_size": 16, **changes}, RECIPES)


def _store(tmp_path: Path) -> tuple[MlflowConfig, MlflowClient]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowConfig(tracking_uri=uri), MlflowClient(uri)


def _epochs(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val_top1"))


# ---- a checkpoint is another trial's


def test_another_trials_checkpoint_is_set_aside_and_its_run_not_reopened(tiny_data: Path, tmp_path: Path) -> None:
    tracking, client = _store(tmp_path)
    folder = tmp_path / "seed0"
    seed0 = run_trial(_trial(tiny_data), train=QUIET, tracking=tracking, checkpoint_dir=folder)

    # `train --seed 1 --checkpoint-dir <seed 0's folder>`: neither seed 0's run nor its weights are taken
    seed1 = run_trial(_trial(tiny_data, seed=1), train=QUIET, tracking=tracking, checkpoint_dir=folder)
    assert seed1["run_id"] != seed0["run_id"] and seed1["status"] == "FINISHED"
    run = client.get_run(seed1["run_id"])
    assert run.data.tags["trial_id"] == seed1["trial_id"] != seed0["trial_id"]
    rejected = run.data.tags["checkpoint_rejected"]
    assert f"belongs to trial {seed0['trial_id']}" in rejected and "last.pt.rejected-1" in rejected
    assert (folder / RUN_ID_FILE).read_text() == seed1["run_id"]
    assert load_checkpoint(folder / CHECKPOINT, seed1["trial_id"])["epoch"] == 1
    assert load_checkpoint(folder / "last.pt.rejected-1", seed0["trial_id"])["epoch"] == 1  # kept as it was
    assert _epochs(client, seed1["run_id"]) == [0]
    assert client.get_run(seed0["run_id"]).info.status == "FINISHED"

    # a last.pt copied into a fresh folder of another trial
    other = tmp_path / "seed2"
    other.mkdir()
    shutil.copy(folder / "last.pt.rejected-1", other / CHECKPOINT)
    seed2 = run_trial(_trial(tiny_data, seed=2), train=QUIET, tracking=tracking, checkpoint_dir=other)
    assert "belongs to trial" in client.get_run(seed2["run_id"]).data.tags["checkpoint_rejected"]
    assert load_checkpoint(other / CHECKPOINT, seed2["trial_id"])["epoch"] == 1
    assert (other / "last.pt.rejected-1").read_bytes() == (folder / "last.pt.rejected-1").read_bytes()


def test_train_cli_with_another_seeds_checkpoint_dir_trains_its_own_seed(tiny_data: Path,
                                                                         tiny_params: Callable[..., Path],
                                                                         tmp_path: Path) -> None:
    """The user's command from the issue: `train --seed 1 --checkpoint-dir <seed 0's folder>`."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # tiny_params' store
    folder = tmp_path / "ckpt"

    def train(seed: int) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--backbone", "resnet18", "--head",
                               "kind=baseline", "--data", str(tiny_data), "--img-size", "32", "--epochs", "1",
                               "--batch-size", "16", "--seed", str(seed), "--params", str(tiny_params()),
                               "--checkpoint-dir", str(folder)], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    seed0, seed1 = train(0), train(1)
    assert seed1["run_id"] != seed0["run_id"] and seed1["trial_id"] != seed0["trial_id"]
    run = client.get_run(seed1["run_id"])
    assert run.data.params["trial.seed"] == "1" and run.data.tags["trial_id"] == seed1["trial_id"]
    assert _epochs(client, seed1["run_id"]) == [0], "seed 1 trained its own epoch"
    assert load_checkpoint(folder / CHECKPOINT, seed1["trial_id"])["epoch"] == 1
    assert load_checkpoint(folder / "last.pt.rejected-1", seed0["trial_id"])["epoch"] == 1


def test_fine_tuning_starts_only_from_its_source_trials_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    reid = tmp_path / "reid"
    prepare(PrepareConfig(source="builtin_reid", out=str(reid), resize=32, builtin=BuiltinDataConfig(
        train_ids=4, test_ids=4, cameras=3, images_per_id=3, distractors=2, junk=2, image_size=32)), workers=1)
    tracking, client = _store(tmp_path)
    train = TrainConfig(checkpoint_root=str(tmp_path / "ckpt"), progress="off")
    source = _trial(tiny_data)
    classify = run_trial(source, train=train, tracking=tracking)
    path = tmp_path / "ckpt" / classify["trial_id"] / CHECKPOINT
    save_checkpoint(path, {**load_checkpoint(path), "trial_id": "another-trial"})  # intact, but not the source's
    finetune = dataclasses.replace(_trial(reid, recipe="reid_finetune", batch_size=4), init_from=source)
    with pytest.raises(CheckpointError, match=f"belongs to trial another-trial, not {classify['trial_id']}"):
        run_trial(finetune, train=train, tracking=tracking, experiment="finetune")
    (run,) = client.search_runs([client.get_experiment_by_name("finetune").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"].startswith("CheckpointError: ")


# ---- a damaged checkpoint


class Crash(Exception):
    pass


def _damage(path: Path, how: str) -> bytes:
    """Overwrite 64 bytes in the middle of the file (with finite float32s: the weights still load and train)
    or cut it in half; returns the damaged content."""
    data = path.read_bytes()
    middle = len(data) // 2
    data = data[:middle] + b"\x01" * 64 + data[middle + 64:] if how == "overwritten" else data[:middle]
    path.write_bytes(data)
    return data


def _crash(row: dict[str, float]) -> None:
    raise Crash(f"after epoch {int(row['epoch'])}")


@pytest.mark.parametrize("damage", ["overwritten", "truncated"])
def test_a_damaged_checkpoint_is_set_aside_and_the_trial_trains_from_scratch(tiny_data: Path, tmp_path: Path,
                                                                            damage: str) -> None:
    tracking, client = _store(tmp_path)
    folder = tmp_path / "ckpt"
    trial = _trial(tiny_data, epochs=2)
    with pytest.raises(Crash):  # a trial that stopped after epoch 1 of 2: its last.pt holds epoch 1
        run_trial(trial, train=QUIET, tracking=tracking, checkpoint_dir=folder, on_epoch=_crash)
    stopped = (folder / RUN_ID_FILE).read_text()
    path = folder / CHECKPOINT
    data = _damage(path, damage)

    result = run_trial(trial, train=QUIET, tracking=tracking, checkpoint_dir=folder)
    assert result["status"] == "FINISHED" and result["run_id"] != stopped
    run = client.get_run(result["run_id"])
    reason = run.data.tags["checkpoint_rejected"]
    assert ("damaged" if damage == "overwritten" else "truncated") in reason and str(path) in reason
    assert (folder / "last.pt.rejected-1").read_bytes() == data  # kept as found
    assert load_checkpoint(path, result["trial_id"])["epoch"] == 2
    assert _epochs(client, result["run_id"]) == [0, 1]  # trained from scratch, every epoch in the new run
    assert client.get_run(stopped).info.status == "FAILED"


def test_the_report_skips_a_damaged_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    tracking, client = _store(tmp_path)
    train = TrainConfig(checkpoint_root=str(tmp_path / "ckpt"), progress="off")
    result = run_trial(_trial(tiny_data, head={"kind": "noah"}), train=train, tracking=tracking, experiment="table7")
    _damage(tmp_path / "ckpt" / result["trial_id"] / CHECKPOINT, "overwritten")
    baseline = client.create_run(client.get_experiment_by_name("table7").experiment_id).info.run_id
    rows = [{"row": 1, "backbone": "resnet18",
             "runs": [{"seed": 0, "status": "FINISHED", "run_id": baseline, "top1": 50.0}]},
            {"row": 2, "backbone": "resnet18", "head": {"kind": "noah", "N": 4, "r": 0.5},
             "runs": [{"seed": 0, "status": "FINISHED", "run_id": result["run_id"], "trial_id": result["trial_id"],
                       "top1": result["top1"]}]}]
    results = tmp_path / "results"
    results.mkdir()
    (results / "table7.json").write_text(json.dumps({"meta": {"profile": "smoke"}, "rows": rows}))
    build_reports(results, tmp_path / "reports", tracking.tracking_uri, checkpoints=tmp_path / "ckpt")
    index = (tmp_path / "reports" / "README.md").read_text()
    assert f"run {result['run_id']}: CheckpointError: " in index and "damaged" in index
    assert not (tmp_path / "reports" / "figures" / "attention.png").exists()


# ---- a full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: room for the run id file, not for a checkpoint. Mounting needs root (as in CI)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_fails_the_trial_naming_the_checkpoint_and_the_cause(tiny_data: Path, tmp_path: Path,
                                                                        small_disk: Path) -> None:
    tracking, client = _store(tmp_path)
    with pytest.raises(OSError, match="No space left on device") as err:
        run_trial(_trial(tiny_data), train=QUIET, tracking=tracking, experiment="disk", checkpoint_dir=small_disk)
    assert str(small_disk / CHECKPOINT) in str(err.value)
    (run,) = client.search_runs([client.get_experiment_by_name("disk").experiment_id])
    assert run.info.status == "FAILED"
    reason = run.data.tags["failure_reason"]
    assert reason.startswith("OSError: ") and "No space left on device" in reason, reason
    assert str(small_disk / CHECKPOINT) in reason
    assert sorted(p.name for p in small_disk.iterdir()) == sorted([LOCK, RUN_ID_FILE]), "no temp file is left behind"


# ---- signals


def _train_past_epoch_1(data: Path, params: Path, folder: Path, log: Path, epochs: int) -> subprocess.Popen:
    """`python -m pipeline train` of `_trial(data, epochs=epochs)` into `folder`, returned (still training) once
    its epoch 1 is checkpointed and logged."""
    cmd = [sys.executable, "-m", "pipeline", "train", "--backbone", "resnet18", "--head", "kind=baseline",
           "--data", str(data), "--img-size", "32", "--epochs", str(epochs), "--batch-size", "16",
           "--params", str(params), "--checkpoint-dir", str(folder)]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    while f"epoch 1/{epochs}" not in log.read_text():  # printed once epoch 1 is checkpointed and logged
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "the trainer never finished its first epoch"
        time.sleep(0.05)
    return proc


def test_sigterm_ends_the_run_killed_and_keeps_the_last_checkpoint(tiny_data: Path, tiny_params: Callable[..., Path],
                                                                   tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # tiny_params' store
    folder = tmp_path / "ckpt"
    log = tmp_path / "train.log"
    proc = _train_past_epoch_1(tiny_data, tiny_params(), folder, log, 100)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, log.read_text()[-2000:]
    assert "interrupted by SIGTERM" in log.read_text()
    run = client.get_run((folder / RUN_ID_FILE).read_text())
    assert run.info.status == "KILLED"
    assert run.data.tags["failure_reason"] == "interrupted: SIGTERM"
    state = load_checkpoint(folder / CHECKPOINT, run.data.tags["trial_id"])
    assert 1 <= state["epoch"] < 100
    assert not list(folder.glob(".*.tmp")), "an interrupted write leaves no temp file"


@pytest.mark.parametrize("how", ["damaged", "retrain"])
def test_a_run_a_killed_trainer_left_running_is_ended_by_the_run_that_supersedes_it(
        tiny_data: Path, tiny_params: Callable[..., Path], tmp_path: Path, how: str) -> None:
    """SIGKILL leaves the run RUNNING; the next training into the folder starts a new run (its checkpoint
    rejected, or `--retrain`) and ends the old one KILLED, naming its successor."""
    tracking, client = _store(tmp_path)  # tiny_params' store
    folder = tmp_path / "ckpt"
    proc = _train_past_epoch_1(tiny_data, tiny_params(), folder, tmp_path / "train.log", 3)
    proc.kill()
    proc.wait()
    left = (folder / RUN_ID_FILE).read_text()
    assert client.get_run(left).info.status == "RUNNING"
    if how == "damaged":
        _damage(folder / CHECKPOINT, "overwritten")
    result = run_trial(_trial(tiny_data, epochs=3), train=QUIET, tracking=tracking, checkpoint_dir=folder,
                       reuse=how != "retrain")
    assert result["status"] == "FINISHED" and result["run_id"] != left
    old = client.get_run(left)
    assert old.info.status == "KILLED" and old.data.tags["superseded_by"] == result["run_id"]
    reason = old.data.tags["failure_reason"]
    assert reason.startswith(f"superseded by run {result['run_id']}: ")
    assert ("checkpoint was rejected" if how == "damaged" else "--retrain") in reason, reason


# ---- a deleted experiment


def test_a_deleted_experiment_is_restored_and_the_trial_runs(tiny_data: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    tracking, client = _store(tmp_path)
    folder = tmp_path / "ckpt"
    first = run_trial(_trial(tiny_data), train=QUIET, tracking=tracking, experiment="x", checkpoint_dir=folder)
    experiment = client.get_experiment_by_name("x").experiment_id
    client.delete_experiment(experiment)
    again = run_trial(_trial(tiny_data), train=QUIET, tracking=tracking, experiment="x", checkpoint_dir=folder)
    assert again["status"] == "FINISHED"
    assert client.get_experiment(experiment).lifecycle_stage == "active"
    assert client.get_run(again["run_id"]).info.experiment_id == experiment
    assert f"restored the deleted MLflow experiment 'x' (id {experiment})" in capsys.readouterr().err
    assert client.get_run(first["run_id"]).info.status == "FINISHED"


# ---- file modes


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_respect_the_umask(tiny_data: Path, tmp_path: Path, umask: int, mode: int) -> None:
    tracking, _ = _store(tmp_path)
    folder = tmp_path / "ckpt"
    previous = os.umask(umask)
    try:
        run_trial(_trial(tiny_data), train=QUIET, tracking=tracking, checkpoint_dir=folder)
    finally:
        os.umask(previous)
    for name in (CHECKPOINT, RESULT, RUN_ID_FILE):
        assert stat.S_IMODE((folder / name).stat().st_mode) == mode, name
