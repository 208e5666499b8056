"""Training engine: real ResNet18+NOAH trials on a tiny built-in dataset, tracked in a temporary MLflow
SQLite store: complete runs, SIGKILL and resume, bit-exact repeats and the machine each run records,
2-worker Ray Train, NaN loss, recipes and identity."""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipeline import REPO_ROOT
from pipeline.config import BuiltinDataConfig, ConfigError, MlflowConfig, PrepareConfig, TrainConfig, load_params
from pipeline.data.prepare import prepare
from pipeline.models import build_model
from pipeline.training.engine import NonFiniteLossError
from pipeline.training.recipes import build_optimizer, build_scheduler, get_recipe, scale
from pipeline.training.record import CHECKPOINT, load_checkpoint
from pipeline.training.run import run_trial
from pipeline.training.tracking import EPOCH_METRICS, git_commit
from pipeline.training.trial import Trial, resolve_trial, trial_id
from pipeline.utils.cluster import process_cpus
from pipeline.utils.machine import machine_facts, machine_kind

IMG, BATCH = 32, 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 shape classes: 64 training images (8 steps of 8), 16 validation images."""
    out = tmp_path_factory.mktemp("data") / "builtin"
    prepare(PrepareConfig(source="builtin", out=str(out), resize=40,
                          builtin=BuiltinDataConfig(num_classes=4, train_per_class=16, val_per_class=4,
                                                    image_size=48)), workers=1)
    return out


RECIPES = load_params().recipes


def _trial(data_dir: Path, **changes: Any) -> Trial:
    data = {"backbone": "resnet18", "data_dir": str(data_dir), "head": {"kind": "noah"}, "recipe": "resnet",
            "img_size": IMG, "epochs": 2, "batch_size": BATCH}
    return resolve_trial({**data, **changes}, RECIPES)


def _store(tmp_path: Path) -> tuple[MlflowConfig, MlflowClient]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowConfig(tracking_uri=uri), MlflowClient(uri)


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


QUIET = TrainConfig(progress="off")
FACTS = ("cpu", "isa", "threads", "torch", "cuda", "cudnn", "gpu", "deterministic", "workers")
TIMINGS = ("train_seconds", "images_per_s", "images_per_s_epoch", "epoch_seconds", "data_wait_fraction",
           "loader_images_per_s")
"""Metrics that time the run: everything else a trial computes must repeat bit for bit."""


def _logged(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """What a run holds, independent of values: param keys, metric keys with their steps, artifacts."""
    run = client.get_run(run_id)
    return {"status": run.info.status, "params": set(run.data.params),
            "metrics": {k: _steps(client, run_id, k) for k in run.data.metrics},
            "artifacts": {a.path for a in client.list_artifacts(run_id)}}


# ---- a complete run


@pytest.mark.slow
def test_trial_leaves_a_complete_mlflow_run_and_is_reused(data_dir: Path, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    tracking, client = _store(tmp_path)
    trial = _trial(data_dir)
    seen: list[dict[str, float]] = []
    result = run_trial(trial, train=QUIET, tracking=dataclasses.replace(tracking, log_weights=True),
                       experiment="table_test", checkpoint_dir=tmp_path / "ckpt", on_epoch=seen.append)

    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and result["status"] == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "table_test"
    params = run.data.params
    assert params["trial.backbone"] == "resnet18" and params["trial.head.kind"] == "noah"
    assert (params["trial.head.N"], params["trial.head.r"]) == ("4", "0.5")  # filled from backbones.csv
    assert params["trial.recipe.optimizer"] == "sgd"
    assert float(params["scaled.lr"]) == pytest.approx(0.1 * BATCH / 256)  # linear lr scaling
    assert not any(value in os.environ.values() for value in params.values() if len(value) > 12)
    for key in EPOCH_METRICS:
        assert _steps(client, run.info.run_id, key) == [0, 1], key
    assert [int(row["epoch"]) for row in seen] == [0, 1]
    metrics = run.data.metrics
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100 and metrics["top1"] == result["top1"]
    assert metrics["images_per_s"] > 0 and result["params"] > 11_000_000 and result["madds"] > 0
    tags = run.data.tags
    assert tags["trial_id"] == trial_id(trial) == result["trial_id"]
    assert tags["compiled"] == "false" and params["train.compile"] == "None"  # null: off on a CPU
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", tags["git_commit"])
    assert len(tags["data_manifest_hash"]) == 64
    artifacts = _logged(client, run.info.run_id)["artifacts"]
    assert {"config.yaml", "metrics.csv", "learning_curve.png", "weights"} <= artifacts
    csv_file = Path(client.download_artifacts(run.info.run_id, "metrics.csv", str(tmp_path)))
    assert len(csv_file.read_text().strip().splitlines()) == 3  # header + 2 epochs
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text())
    assert config["trial_id"] == result["trial_id"] and config["scaled"]["epochs"] == 2

    state = load_checkpoint(tmp_path / "ckpt" / CHECKPOINT, result["trial_id"])
    assert state["epoch"] == 2
    model = build_model("resnet18", {"kind": "noah"}, 4, IMG)
    model.load_state_dict(state["model"])

    # how it runs is not what it computes: a compiled trial is the same trial (and would compile, not reuse)
    again = run_trial(trial, train=dataclasses.replace(QUIET, compile=True), tracking=tracking,
                      checkpoint_dir=tmp_path / "other")
    assert again["run_id"] == result["run_id"] and again["top1"] == result["top1"]
    assert again["machine"] == result["machine"] == tags["machine.kind"]  # a results row says where it ran
    assert not (tmp_path / "other" / CHECKPOINT).exists()  # the FINISHED run was reused, not retrained
    said = capfd.readouterr().err.splitlines()
    assert f"reusing finished run {result['run_id']} of {trial.label} (trial {result['trial_id']}; " \
           "--retrain trains again)" in said


# ---- SIGKILL mid-epoch, then resume


def _train_cmd(data_dir: Path, params_file: Path, ckpt: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", "--backbone", "resnet18", "--head", "kind=noah",
            "--recipe", "resnet", "--data", str(data_dir), "--img-size", str(IMG), "--epochs", "3",
            "--batch-size", str(BATCH), "--params", str(params_file), "--checkpoint-dir", str(ckpt),
            "--experiment", "kill_test", "--loader-workers", "2"]


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_from_last_checkpoint_and_logs_each_epoch_once(data_dir: Path,
                                                                                  tmp_path: Path) -> None:
    """With 2 loader workers: the resumed run ends with the weights of an uninterrupted one (0 workers)."""
    tracking, client = _store(tmp_path)
    params_file = tmp_path / "params.yaml"
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params.update(mlflow={"tracking_uri": tracking.tracking_uri}, train={"progress": "bar"})
    params_file.write_text(yaml.safe_dump(params))
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    log = tmp_path / "first.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(_train_cmd(data_dir, params_file, ckpt), cwd=REPO_ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        # the tqdm bar of epoch 2 has moved past its first step but not to its end: mid-epoch
        mid_epoch = re.compile(r"epoch 2/3:\s+\d+%\S*\s*\| [1-7]/8")
        deadline = time.monotonic() + 300
        while not mid_epoch.search(log.read_text()):
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "the trainer never reached the middle of epoch 2"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(ckpt / CHECKPOINT)["epoch"] == 1
    run_id = (ckpt / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "RUNNING"

    second = subprocess.run(_train_cmd(data_dir, params_file, ckpt), cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "epoch 1/3" not in second.stderr and "epoch 2/3" in second.stderr  # resumed at epoch 2
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # the same run, not a second one
    for key in EPOCH_METRICS:
        assert _steps(client, run_id, key) == [0, 1, 2], key
    # the same trial uninterrupted, with no loader workers, in its own store (the CLI, so the same threads)
    whole = subprocess.run([*_train_cmd(data_dir, params_file, tmp_path / "whole"), "--loader-workers", "0",
                            "--tracking-uri", f"sqlite:///{tmp_path / 'whole.db'}"],
                           cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed, uninterrupted = (load_checkpoint(d / CHECKPOINT) for d in (ckpt, tmp_path / "whole"))
    assert killed["trial_id"] == uninterrupted["trial_id"]
    assert all(torch.equal(killed["model"][k], uninterrupted["model"][k]) for k in killed["model"])


@pytest.mark.slow
def test_a_resumed_trial_ends_exactly_where_an_uninterrupted_one_does(data_dir: Path, tmp_path: Path,
                                                                    capfd: pytest.CaptureFixture[str]) -> None:
    # deit_pvt: warm-up, Mixup/CutMix, RandAugment, Random Erasing: every random draw is reseeded per epoch
    trial = _trial(data_dir, recipe="deit_pvt")
    whole = run_trial(trial, train=QUIET, tracking=_store(tmp_path / "a")[0], checkpoint_dir=tmp_path / "a")

    class Crash(Exception):
        pass

    def crash(row: dict[str, float]) -> None:
        raise Crash(f"after epoch {int(row['epoch'])}")

    tracking, client = _store(tmp_path / "b")
    with pytest.raises(Crash):
        run_trial(trial, train=QUIET, tracking=tracking, checkpoint_dir=tmp_path / "b", on_epoch=crash)
    (failed,) = client.search_runs([client.get_experiment_by_name("noah").experiment_id])
    assert failed.info.status == "FAILED" and "Crash: after epoch 0" in failed.data.tags["failure_reason"]
    # as if the first attempt had run on another kind of machine: the resumed run says it mixed two
    client.set_tag(failed.info.run_id, "machine.kind", "another machine")
    capfd.readouterr()
    resumed = run_trial(trial, train=QUIET, tracking=tracking, checkpoint_dir=tmp_path / "b")
    assert f"resuming {trial.label} from epoch 2/2 (checkpoint {tmp_path / 'b' / CHECKPOINT})" \
        in capfd.readouterr().err.splitlines()
    assert resumed["run_id"] == failed.info.run_id and client.get_run(failed.info.run_id).info.status == "FINISHED"
    tags = client.get_run(failed.info.run_id).data.tags
    assert "failure_reason" not in tags
    assert tags["machine.kind"] == resumed["machine"] == whole["machine"]  # this attempt's facts overwrite
    assert tags["machine.kinds"] == f"another machine | {whole['machine']}"
    assert "machine.kinds" not in _store(tmp_path / "a")[1].get_run(whole["run_id"]).data.tags  # one machine
    a, b = (load_checkpoint(tmp_path / d / CHECKPOINT, whole["trial_id"]) for d in ("a", "b"))
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["top1"] == whole["top1"]


@pytest.mark.slow
def test_a_trial_repeats_bit_for_bit_whatever_the_loader_workers_and_records_its_machine(
        data_dir: Path, tmp_path: Path) -> None:
    """The same trial trained from scratch again (into its own store), with 1 or 2 loader workers, or resumed
    after a crash: the same metrics and the same weights. NOAH's dropout and the sampler draw random numbers:
    none may depend on how many processes decode. Each run trains with the process's CPUs as torch threads,
    whatever the caller had set, and records them with the rest of its machine in `machine.*` tags."""
    trial = _trial(data_dir)
    runs = {}
    for workers in (0, 1, 2):
        folder = tmp_path / f"w{workers}"
        runs[workers] = run_trial(trial, train=dataclasses.replace(QUIET, loader_workers=workers),
                                  tracking=_store(folder)[0], checkpoint_dir=folder)
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(1 if process_cpus() > 1 else 2)  # a caller with another setting: the trial fixes its own
    try:
        runs["again"] = run_trial(trial, train=dataclasses.replace(QUIET, loader_workers=0),
                                  tracking=_store(tmp_path / "again")[0], checkpoint_dir=tmp_path / "again")
        assert torch.get_num_threads() == (1 if process_cpus() > 1 else 2)  # and gives the caller's back
    finally:
        torch.set_num_threads(caller_threads)

    class Crash(Exception):
        pass

    def crash(row: dict[str, float]) -> None:
        raise Crash(f"after epoch {int(row['epoch'])}")

    two = dataclasses.replace(QUIET, loader_workers=2)
    tracking = _store(tmp_path / "killed")[0]
    with pytest.raises(Crash):
        run_trial(trial, train=two, tracking=tracking, checkpoint_dir=tmp_path / "killed", on_epoch=crash)
    runs["resumed"] = run_trial(trial, train=two, tracking=tracking, checkpoint_dir=tmp_path / "killed")
    states = {k: load_checkpoint(tmp_path / d / CHECKPOINT, runs[0]["trial_id"])
              for k, d in ((0, "w0"), (1, "w1"), (2, "w2"), ("again", "again"), ("resumed", "killed"))}

    def computed(row: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in row.items() if k not in TIMINGS and k not in ("run_id", "status", "reason")}

    for key in (1, 2, "again", "resumed"):
        assert [computed(r) for r in states[key]["history"]] == [computed(r) for r in states[0]["history"]], key
        assert states[key]["model"].keys() == states[0]["model"].keys()
        assert all(torch.equal(states[0]["model"][k], states[key]["model"][k]) for k in states[0]["model"]), key
        assert computed(runs[key]) == computed(runs[0]), key  # top1, top5, best_top1, params, madds, machine
    for key, folder in ((0, "w0"), (1, "w1"), (2, "w2"), ("again", "again"), ("resumed", "killed")):
        tags = _store(tmp_path / folder)[1].get_run(runs[key]["run_id"]).data.tags
        facts = {fact: tags[f"machine.{fact}"] for fact in FACTS}
        assert facts["threads"] == str(process_cpus()) and facts["deterministic"] == "false"
        assert tags["machine.kind"] == machine_kind(facts) == runs[key]["machine"] == runs[0]["machine"]
        assert "machine.kinds" not in tags  # the crashed and the resumed attempt: one kind of machine


@pytest.mark.slow
@pytest.mark.gpu
def test_deterministic_gpu_trials_repeat_bit_for_bit_and_every_run_records_its_mode(data_dir: Path,
                                                                                     tmp_path: Path) -> None:
    trial = _trial(data_dir, epochs=1)
    exact = dataclasses.replace(QUIET, use_gpu=True, deterministic=True)
    runs = {name: run_trial(trial, train=exact, tracking=_store(tmp_path / name)[0], checkpoint_dir=tmp_path / name)
            for name in ("a", "b")}
    a, b = (load_checkpoint(tmp_path / name / CHECKPOINT, runs[name]["trial_id"]) for name in ("a", "b"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert runs["a"]["top1"] == runs["b"]["top1"] and runs["a"]["machine"] == runs["b"]["machine"]
    tags = _store(tmp_path / "a")[1].get_run(runs["a"]["run_id"]).data.tags
    assert tags["machine.gpu"] == torch.cuda.get_device_name() and tags["machine.deterministic"] == "true"
    assert runs["a"]["machine"].endswith(", deterministic")
    fast = run_trial(trial, train=dataclasses.replace(exact, deterministic=False), tracking=_store(tmp_path / "f")[0],
                     checkpoint_dir=tmp_path / "f")
    assert fast["machine"] == runs["a"]["machine"].removesuffix(", deterministic") + ", fast"


# ---- Ray Train, 2 workers


@pytest.mark.slow
def test_two_ray_train_workers_log_like_one(data_dir: Path, tmp_path: Path) -> None:
    import ray

    tracking, client = _store(tmp_path)
    trial = _trial(data_dir, epochs=1)
    one = run_trial(trial, train=QUIET, tracking=tracking, experiment="one", checkpoint_dir=tmp_path / "c1")
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    try:
        two = run_trial(trial, train=dataclasses.replace(QUIET, num_workers=2), tracking=tracking,
                        experiment="two", checkpoint_dir=tmp_path / "c2", reuse=False)
    finally:
        ray.shutdown()
    assert two["run_id"] != one["run_id"] and two["trial_id"] == one["trial_id"]
    logged_one, logged_two = _logged(client, one["run_id"]), _logged(client, two["run_id"])
    assert logged_two == logged_one and logged_two["status"] == "FINISHED"
    run = client.get_run(two["run_id"])
    assert run.data.params["train.num_workers"] == "2" and run.data.tags["world_size"] == "2"
    # rank 0 records its machine: its torch threads are its Ray share (one CPU per worker here)
    assert run.data.tags["machine.threads"] == "1" and run.data.tags["machine.kind"].endswith(", 2 workers")
    assert client.get_run(one["run_id"]).data.tags["world_size"] == "1"
    assert 0 <= run.data.metrics["top1"] <= 100 and run.data.metrics["params"] == one["params"]
    state = load_checkpoint(tmp_path / "c2" / CHECKPOINT, two["trial_id"])
    assert state["epoch"] == 1 and not any(k.startswith("module.") for k in state["model"])


# ---- failures


@pytest.mark.slow
def test_nan_loss_fails_the_run_quickly_with_its_reason(data_dir: Path, tmp_path: Path) -> None:
    tracking, client = _store(tmp_path)
    exploding = dataclasses.replace(get_recipe("resnet", RECIPES), lr=1e30, name="exploding")
    trial = _trial(data_dir, recipe=exploding, epochs=3)
    start = time.perf_counter()
    with pytest.raises(NonFiniteLossError, match="update [1-8]$"):
        run_trial(trial, train=QUIET, tracking=tracking, experiment="nan", checkpoint_dir=tmp_path / "ckpt")
    (run,) = client.search_runs([client.get_experiment_by_name("nan").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_reason"].startswith("NonFiniteLossError: training loss became")
    assert not (tmp_path / "ckpt" / CHECKPOINT).exists()  # failed within the first epoch
    assert time.perf_counter() - start < 120


def test_bad_trials_are_rejected_before_any_run(data_dir: Path, tmp_path: Path) -> None:
    tracking, client = _store(tmp_path)
    with pytest.raises(ConfigError, match="recipe: got 'nope'"):
        run_trial(_trial(data_dir, recipe="nope"), tracking=tracking)
    with pytest.raises(ConfigError, match="data_dir"):
        run_trial(_trial(tmp_path / "missing"), tracking=tracking)
    with pytest.raises(ConfigError, match="even batch"):
        run_trial(_trial(data_dir, recipe="deit_pvt", batch_size=7), tracking=tracking)
    with pytest.raises(ConfigError, match="backbone"):
        run_trial(_trial(data_dir, backbone="resnet19"), tracking=tracking)
    assert client.search_experiments() == [] or all(
        not client.search_runs([e.experiment_id]) for e in client.search_experiments())


# ---- the machine a run records (no training)


def test_machine_facts_and_kind_name_what_a_bit_exact_repeat_needs() -> None:
    facts = machine_facts(torch.device("cpu"), deterministic=True)
    assert tuple(facts) == FACTS and all(isinstance(v, str) and v for v in facts.values())
    assert facts["threads"] == str(torch.get_num_threads()) and facts["torch"] == torch.__version__
    assert facts["gpu"] == "none" and facts["deterministic"] == "true" and facts["workers"] == "1"
    assert facts["isa"] == torch.backends.cpu.get_cpu_capability()
    kind = machine_kind(facts)
    assert kind.startswith(f"{facts['cpu']}, {facts['isa']}, ") and kind.endswith(f"torch {torch.__version__}, CPU")
    assert machine_kind(facts | {"deterministic": "false", "cudnn": "other"}) == kind  # CPU: neither matters
    assert ", 1 thread," in machine_kind(facts | {"threads": "1"})
    assert ", 2 threads," in machine_kind(facts | {"threads": "2"})
    gpu = facts | {"gpu": "NVIDIA H100 80GB HBM3", "cuda": "12.8", "cudnn": "91002"}
    assert machine_kind(gpu).endswith(", NVIDIA H100 80GB HBM3, CUDA 12.8, cuDNN 91002, deterministic")
    assert machine_kind(gpu | {"deterministic": "false"}).endswith(", fast")
    assert machine_kind(gpu | {"workers": "8"}).endswith(", deterministic, 8 workers")


# ---- recipes, schedules, identity (no training)


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "shufflenet", "deit_pvt", "mixer_gmlp", "aggressive",
                                  "reid_scratch", "reid_finetune"])
def test_every_recipe_builds_and_scaling_keeps_its_shape(name: str) -> None:
    recipe = get_recipe(name, RECIPES)
    paper = scale(recipe)
    small = scale(recipe, epochs=recipe.epochs // 10, batch_size=recipe.batch_size // 4)
    assert small.lr == pytest.approx(recipe.lr / 4)
    assert small.warmup_epochs / small.epochs == pytest.approx(paper.warmup_epochs / paper.epochs)
    assert [m / small.epochs for m in small.milestones] == pytest.approx([m / paper.epochs for m in paper.milestones])
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    optimizer = build_optimizer(model, small)
    decays = {len(g["params"]): g["weight_decay"] for g in optimizer.param_groups}
    if recipe.no_decay_norm_bias:
        assert decays == {3: 0.0, 1: recipe.weight_decay}  # conv bias, BN weight and bias: no decay
    else:
        assert set(decays.values()) == {recipe.weight_decay}
    build_scheduler(optimizer, small, updates_per_epoch=10)


def _lr_at(scheduler: Any, optimizer: torch.optim.Optimizer, epoch: float, updates: int) -> float:
    scheduler.step_update(num_updates=round(epoch * updates))
    return optimizer.param_groups[0]["lr"]


def test_schedules_follow_the_appendix_at_any_length() -> None:
    model = torch.nn.Linear(2, 2)
    for epochs in (100, 10):  # the paper's length and a profile's
        resnet = scale(get_recipe("resnet", RECIPES), epochs=epochs, batch_size=256)
        opt = build_optimizer(model, resnet)
        sched = build_scheduler(opt, resnet, updates_per_epoch=10)
        lrs = [_lr_at(sched, opt, f * epochs, 10) for f in (0, 0.29, 0.31, 0.61, 0.91)]
        assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.0001])  # x0.1 every 30% of the epochs
        aggressive = scale(get_recipe("aggressive", RECIPES), epochs=epochs * 3, batch_size=4096)
        opt = build_optimizer(model, aggressive)
        sched = build_scheduler(opt, aggressive, updates_per_epoch=10)
        warm = 20 / 300 * aggressive.epochs
        assert _lr_at(sched, opt, warm / 2, 10) == pytest.approx(0.002, rel=0.05)  # linear warm-up
        assert _lr_at(sched, opt, warm, 10) == pytest.approx(0.004, rel=1e-3)
        assert _lr_at(sched, opt, aggressive.epochs, 10) == pytest.approx(1e-6, abs=1e-6)  # cosine to min
        shuffle = scale(get_recipe("shufflenet", RECIPES), epochs=epochs, batch_size=1024)
        opt = build_optimizer(model, shuffle)
        sched = build_scheduler(opt, shuffle, updates_per_epoch=10)
        assert _lr_at(sched, opt, epochs / 2, 10) == pytest.approx(0.25)  # linear to zero


def test_trial_identity_covers_what_determines_a_result(data_dir: Path, tmp_path: Path) -> None:
    base = trial_id(_trial(data_dir))
    assert trial_id(_trial(data_dir)) == base == trial_id(_trial(data_dir, width=1.0))
    assert trial_id(_trial(data_dir, head={"kind": "noah", "N": 4, "r": 0.5})) == base  # resolved defaults
    assert trial_id(_trial(data_dir, recipe=get_recipe("resnet", RECIPES))) == base
    assert trial_id(_trial(data_dir, recipe=dataclasses.replace(get_recipe("resnet", RECIPES), name="renamed"))) == base
    changed = [_trial(data_dir, seed=1), _trial(data_dir, epochs=3), _trial(data_dir, batch_size=16),
               _trial(data_dir, img_size=64), _trial(data_dir, width=0.5), _trial(data_dir, head={"kind": "baseline"}),
               _trial(data_dir, head={"kind": "noah", "aggregation": "max"}), _trial(data_dir, recipe="mobilenet"),
               _trial(data_dir, recipe=dataclasses.replace(get_recipe("resnet", RECIPES), weight_decay=0.0))]
    ids = {trial_id(t) for t in changed}
    assert len(ids) == len(changed) and base not in ids
    copy = tmp_path / "copy"  # the same data elsewhere is the same trial; edited data is not
    copy.mkdir()
    for name in ("manifest.csv", "classes.json", "stats.json"):
        (copy / name).write_bytes((data_dir / name).read_bytes())
    assert trial_id(_trial(copy)) == base
    (copy / "manifest.csv").write_text((data_dir / "manifest.csv").read_text().replace(",0,train,", ",1,train,", 1))
    assert trial_id(_trial(copy)) != base


@pytest.mark.slow
def test_bench_train_measures_both_loops_on_the_same_work(data_dir: Path) -> None:
    from pipeline.bench.train import bench
    from pipeline.config import HeadConfig

    out = bench("resnet18", HeadConfig(kind="noah"), "aggressive", img_size=32, batch_size=4, steps=2, repeats=1,
                num_classes=10, device=torch.device("cpu"), data_dir=str(data_dir), loader_workers=1)
    # the trainer side with Mixup, CutMix and EMA on, in memory and on the loader's batches
    assert out["head"] == "noah(N=4,r=0.5)" and out["bare_images_per_s"] > 0 and out["trainer_images_per_s"] > 0
    assert out["ratio"] == pytest.approx(out["trainer_images_per_s"] / out["bare_images_per_s"])
    assert out["head_ratio"] == pytest.approx(out["trainer_images_per_s"] / out["baseline_images_per_s"])
    assert not out["compile"] and "trainer_compiled_images_per_s" not in out
    assert out["loader_ratio"] == pytest.approx(out["loader_images_per_s"] / out["trainer_images_per_s"])


# ---- the commit a run is stamped with


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_the_commit_stamp_ignores_what_dvc_repro_rewrites_but_not_code_edits(tmp_path: Path) -> None:
    """`dvc repro` rewrites dvc.lock, results/ and reports/ while it runs: a clean checkout still stamps its
    plain commit; an edited source file (or a DVC output deleted beside one) is `-dirty`."""
    for path in ("dvc.lock", "results/table4.json", "reports/README.md", "pipeline/run.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("v1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "c")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert git_commit(tmp_path) == head
    for path in ("dvc.lock", "results/table4.json", "reports/README.md"):
        (tmp_path / path).write_text("v2\n")
    (tmp_path / "untracked.txt").write_text("scratch\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "pipeline/run.py").write_text("v2\n")
    assert git_commit(tmp_path) == f"{head}-dirty"
    assert git_commit(tmp_path / "pipeline") == f"{head}-dirty"  # from a subfolder: the whole worktree counts
    assert git_commit(tmp_path.parent / "not-a-repo-here") == "unknown"
