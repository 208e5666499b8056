"""Checkpoint disk use, with real resnet18 trials at 32 px on `tiny_data`: a FINISHED trial keeps its final
weights only (and fine-tuning still starts from them), and `python -m pipeline clean` removes exactly what
no resume and no fine-tuning needs, printing it, and nothing with `--dry-run`."""
from __future__ import annotations

import dataclasses
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipeline.__main__ import main
from pipeline.config import BuiltinDataConfig, MlflowConfig, PrepareConfig, TrainConfig, load_params
from pipeline.data.prepare import prepare
from pipeline.study.clean import apply, plan_clean
from pipeline.training.record import CHECKPOINT, LOCK, load_checkpoint, save_checkpoint
from pipeline.training.run import run_trial
from pipeline.training.trial import Trial, resolve_trial

pytestmark = pytest.mark.slow

RECIPES = load_params().recipes


def _trial(data: Path, **changes: Any) -> Trial:
    return resolve_trial({"backbone": "resnet18", "head": {"kind": "noah"}, "recipe": "resnet",
                          "data_dir": str(data), "img_size": 32, "epochs": 2, "batch_size": 16, **changes}, RECIPES)


def _train(tmp_path: Path) -> TrainConfig:
    return TrainConfig(checkpoint_root=str(tmp_path / "ckpt"), progress="off")


def _tracking(tmp_path: Path) -> MlflowConfig:
    return MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def _weights_bytes(state: dict[str, torch.Tensor]) -> int:
    buffer = BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


class Crash(Exception):
    pass


def _crash(row: dict[str, float]) -> None:
    raise Crash(f"after epoch {int(row['epoch'])}")


def test_a_finished_trial_keeps_its_weights_only_and_fine_tuning_starts_from_them(tiny_data: Path,
                                                                                   tmp_path: Path) -> None:
    train, tracking = _train(tmp_path), _tracking(tmp_path)
    source = _trial(tiny_data)
    with pytest.raises(Crash):  # interrupted after epoch 1 of 2: its checkpoint holds what resuming needs
        run_trial(source, train=train, tracking=tracking, on_epoch=_crash)
    (folder,) = (tmp_path / "ckpt").iterdir()
    unfinished = (folder / CHECKPOINT).stat().st_size
    assert {"optimizer", "ema"} <= load_checkpoint(folder / CHECKPOINT, folder.name).keys()

    classify = run_trial(source, train=train, tracking=tracking)  # resumes, finishes, compacts
    state = load_checkpoint(folder / CHECKPOINT, classify["trial_id"])
    assert set(state) == {"epoch", "history", "trial_id", "model"} and state["epoch"] == 2
    finished = (folder / CHECKPOINT).stat().st_size
    assert finished < 1.05 * _weights_bytes(state["model"]) and finished < 0.6 * unfinished
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.yaml", "last.pt", LOCK, "mlflow_run_id",
                                                               "result.json"])

    reid = tmp_path / "reid"
    prepare(PrepareConfig(source="builtin_reid", out=str(reid), resize=32, builtin=BuiltinDataConfig(
        train_ids=4, test_ids=4, cameras=3, images_per_id=3, distractors=2, junk=2, image_size=32)), workers=1)
    finetune = dataclasses.replace(_trial(reid, recipe="reid_finetune", batch_size=4, epochs=1), init_from=source)
    assert run_trial(finetune, train=train, tracking=tracking)["status"] == "FINISHED"


def _params_file(tmp_path: Path, tiny_params: Any) -> Path:
    """Params whose store and checkpoint root are this test's, with one table that fine-tunes nothing."""
    path = tiny_params(mlflow={"tracking_uri": _tracking(tmp_path).tracking_uri},
                       train={"checkpoint_root": str(tmp_path / "ckpt")})
    data = yaml.safe_load(path.read_text())
    data["tables"] = {"table4": {"recipe": "resnet", "rows": {"baseline": {"row": 1, "backbone": "resnet18",
                                                                            "head": {"kind": "baseline"}}}}}
    data["study"] = {"tables": ["table4"]}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_clean_removes_what_it_lists_and_keeps_what_resume_and_fine_tuning_need(
        tiny_data: Path, tmp_path: Path, tiny_params: Any, capsys: pytest.CaptureFixture[str]) -> None:
    train, tracking = _train(tmp_path), _tracking(tmp_path)
    done, source, running = (run_trial(_trial(tiny_data, seed=s), train=train, tracking=tracking) for s in (0, 1, 2))
    with pytest.raises(Crash):
        run_trial(_trial(tiny_data, seed=3), train=train, tracking=tracking, on_epoch=_crash)
    root = tmp_path / "ckpt"
    folders = {name: root / r["trial_id"] for name, r in (("done", done), ("source", source), ("running", running))}
    (unfinished,) = set(root.iterdir()) - set(folders.values())
    rejected = unfinished / f"{CHECKPOINT}.rejected-1"
    rejected.write_bytes(b"set aside")
    full = load_checkpoint(folders["source"] / CHECKPOINT)  # as an older trainer left it: with resume state
    save_checkpoint(folders["source"] / CHECKPOINT, {**full, "optimizer": {"momentum": torch.zeros(1000)}})
    client = MlflowClient(tracking.tracking_uri)  # a --retrain of a finished trial, training now
    client.create_run(client.get_experiment_by_name("noah").experiment_id, tags={"trial_id": running["trial_id"]})
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    params = _params_file(tmp_path, tiny_params)
    assert main(["clean", "--params", str(params), "--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # nothing removed
    assert f"would remove {folders['done'] / CHECKPOINT} (finished, no fine-tuning starts from it)" in listed
    assert f"would remove {folders['source'] / CHECKPOINT}" in listed and str(rejected) in listed
    assert str(folders["running"]) not in listed and str(unfinished / CHECKPOINT) + " " not in listed
    assert "would free" in listed

    # what a configured fine-tuning trial starts from stays, as weights only
    removals = plan_clean(root, tracking.tracking_uri, {source["trial_id"]})
    assert {(r.path, r.compact) for r in removals} == {(folders["done"] / CHECKPOINT, False),
                                                        (folders["source"] / CHECKPOINT, True), (rejected, False)}
    apply(removals)
    assert not (folders["done"] / CHECKPOINT).exists() and (folders["done"] / "result.json").exists()
    assert "optimizer" not in load_checkpoint(folders["source"] / CHECKPOINT, source["trial_id"])
    assert not rejected.exists()
    assert load_checkpoint(unfinished / CHECKPOINT, unfinished.name)["epoch"] == 1  # resumes as before
    assert (folders["running"] / CHECKPOINT).read_bytes() == before[folders["running"] / CHECKPOINT]
    assert plan_clean(root, tracking.tracking_uri, {source["trial_id"]}) == []

    assert main(["clean", "--params", str(params)]) == 0  # the command: no table fine-tunes from `source`
    assert f"remove {folders['source'] / CHECKPOINT}" in capsys.readouterr().out
    assert not (folders["source"] / CHECKPOINT).exists()
    assert (unfinished / CHECKPOINT).exists() and (folders["running"] / CHECKPOINT).exists()
