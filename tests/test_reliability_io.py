"""Reliability of what the pipeline writes and reads: concurrent MLflow logging (embedded SQLite and an
`mlflow server`), bad data roots, unwritable or interrupted output, unsafe checkpoints, bound addresses and
secrets. Each test runs the real code path (real MLflow, real processes, real files)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from tracking_server import free_port

from pipeline import REPO_ROOT
from pipeline.config import ConfigError, load_params
from pipeline.study.sweep import run_study
from pipeline.training.record import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.training.run import run_trial
from pipeline.training.trial import resolve_trial
from pipeline.utils.io import atomic_write_text

# ---- several trials logging at once

PROCESSES, RUNS, EPOCHS = 4, 5, 6

LOGGER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pipeline.training.tracking import TrialRun

    uri, folder = sys.argv[1], Path(sys.argv[2])
    worker, runs, epochs = (int(a) for a in sys.argv[3:6])
    for i in range(runs):
        run = TrialRun.open(uri, "concurrent", folder / f"w{worker}-r{i}", run_name=f"w{worker}-r{i}",
                            tags={"trial_id": f"w{worker}-r{i}"})
        run.log_params({f"p{j}": f"{worker}-{i}-{j}" for j in range(30)})
        for epoch in range(epochs):
            run.log_epochs([{"epoch": epoch, "train_loss": 1.0 / (epoch + 1), "lr": 0.1, "val_top1": epoch,
                             "val_top5": epoch, "images_per_s_epoch": 1.0, "epoch_seconds": 0.01}])
        run.log_final({"top1": worker + i / 10})
        run.finish()
""")


def _log_concurrently(uri: str, folder: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", LOGGER, uri, str(folder), str(w), str(RUNS), str(EPOCHS)],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for w in range(PROCESSES)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * PROCESSES, "\n".join(outputs)


def _assert_nothing_lost(uri: str) -> None:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id], max_results=1000)
    assert sorted(r.info.run_name for r in runs) == sorted(f"w{w}-r{i}" for w in range(PROCESSES) for i in range(RUNS))
    for r in runs:
        w, i = map(int, re.fullmatch(r"w(\d+)-r(\d+)", r.info.run_name).groups())
        assert r.info.status == "FINISHED"
        assert r.data.params == {f"p{j}": f"{w}-{i}-{j}" for j in range(30)}
        assert r.data.metrics["top1"] == pytest.approx(w + i / 10)
        for key in ("train_loss", "val_top1", "val_top5", "lr", "images_per_s_epoch", "epoch_seconds"):
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, key)) == list(range(EPOCHS)), key


@pytest.mark.slow
def test_concurrent_trials_lose_nothing_in_the_embedded_sqlite_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _log_concurrently(uri, tmp_path / "ckpt")
    _assert_nothing_lost(uri)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """An `mlflow server` on 127.0.0.1 (SQLite backend) started for this test and stopped after it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2"],
        cwd=tmp_path, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_concurrent_trials_lose_nothing_through_an_mlflow_server(mlflow_server: str, tmp_path: Path) -> None:
    _log_concurrently(mlflow_server, tmp_path / "ckpt")
    _assert_nothing_lost(mlflow_server)


# ---- a data root that does not exist


@pytest.mark.slow
def test_prepare_stage_names_a_missing_data_root_at_once(tmp_path: Path) -> None:
    params = {"profile": "p", "profiles": {"p": {"dataset": "imgs"}},
              "datasets": {"imgs": {"source": "imagefolder", "root": str(tmp_path / "no-such-root"),
                                    "out": str(tmp_path / "out")}},
              "tables": {}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    start = time.monotonic()
    stage = [sys.executable, "stages/prepare.py", "--params", str(tmp_path / "params.yaml")]
    proc = subprocess.run(stage, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 30
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: datasets.imgs.root: "), lines
    assert str(tmp_path / "no-such-root") in lines[0]
    assert not (tmp_path / "out").exists()


# ---- unwritable and interrupted output


def test_unwritable_results_folder_fails_before_training_and_names_it(tiny_params: Callable[..., Path],
                                                                      tmp_path: Path) -> None:
    """Runs as root in CI, where permissions do not stop writes: the results folder lies under a file."""
    params = load_params(tiny_params(tables={"tw": {"recipe": "resnet", "rows": {
        "baseline": {"row": 1, "backbone": "resnet18", "head": {"kind": "baseline"}}}}}))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        run_study(params, ["tw"], blocker / "results")
    assert err.value.key == "results" and str(blocker) in str(err.value)
    assert time.monotonic() - start < 60, "fails before any trial trains"
    assert not Path(params.train.checkpoint_root).exists(), "no trial started"
    assert blocker.read_text() == "not a folder"


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pipeline.utils.io import atomic_write

    def write(f):
        f.write(b"half of the new ")
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
        f.write(b"content")

    atomic_write(sys.argv[1], write)
""")


def test_a_writer_killed_mid_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "table4.json"
    atomic_write_text(target, '{"old": true}\n')
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir()), "the new content goes to a temp file"
    proc.kill()
    proc.wait()
    assert target.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.glob("*.json")] == ["table4.json"], "a leftover is never a *.json"
    atomic_write_text(target, '{"new": true}\n')
    assert target.read_text() == '{"new": true}\n'


# ---- checkpoints, bound addresses, secrets


class _Payload:
    """Unpickling this would create a file: what an attacker's checkpoint could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(2)}, "x": _Payload(marker)})  # intact, hash and all
    with pytest.raises(CheckpointError, match="[Ww]eights only load failed"):
        load_checkpoint(path)
    assert not marker.exists()
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(2)}, "history": [{"a": 1.0}]})
    assert load_checkpoint(path)["epoch"] == 1


def test_readme_mlflow_commands_bind_to_localhost() -> None:
    text = (REPO_ROOT / "README.md").read_text()
    code = [line for line in text.splitlines() if line.startswith("    ") or line.startswith("\t")]
    commands = [m.group(0) for line in code for m in re.finditer(r"mlflow (ui|server)\b[^&;|#]*", line)]
    assert commands, "the README shows how to browse runs"
    for command in commands:  # loopback, or a cluster's private address behind MLflow's basic authentication
        private = "--app-name basic-auth" in command and re.search(r"--host[ =][A-Z_]*PRIVATE[A-Z_]*\b", command)
        assert re.search(r"--host[ =]127\.0\.0\.1\b", command) or private, command
        assert "0.0.0.0" not in command


SECRET = "s3cr3t-reliability-4b1f0e"


@pytest.mark.slow
def test_no_environment_variable_or_secret_is_logged(tiny_data: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    monkeypatch.setenv("NOAH_API_TOKEN", SECRET)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from pipeline.config import MlflowConfig, TrainConfig

    trial = resolve_trial({"backbone": "resnet18", "head": {"kind": "baseline"}, "recipe": "resnet",
                           "data_dir": str(tiny_data), "img_size": 32, "epochs": 1, "batch_size": 16},
                          load_params().recipes)
    result = run_trial(trial,
                       train=TrainConfig(progress="off"), tracking=MlflowConfig(tracking_uri=uri),
                       experiment="secrets", checkpoint_dir=tmp_path / "ckpt")
    client = MlflowClient(uri)
    run = client.get_run(result["run_id"])
    logged = {**run.data.params, **run.data.tags}
    for key, value in logged.items():
        assert SECRET not in value and SECRET not in key, key
        assert key not in os.environ, f"environment variable {key} logged"
    assert not any(name in logged for name in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "NOAH_API_TOKEN"))
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    for path in artifacts.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
