"""DVC's experiments through real DVC, in a git repository holding this checkout's code and a shrunken
params.yaml (the repository's relative MLflow store, checkpoint root and Ray folder): after a baseline
`dvc repro`, two experiments queued and run side by side (`dvc queue start -j 2`) and one `--temp` run each
run their own params in their own workspace, train only the trial their change makes new (the store and
checkpoints are the main workspace's, shared), never train one trial twice, and leave the main workspace's
files as they were until `dvc exp apply` brings one's results in."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from test_reliability_dvc import TAG, _kill_tagged, _shrink, _trial_runs

from pipeline import REPO_ROOT

pytestmark = pytest.mark.slow

COPIED = ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "pipeline", "stages")
EXPERIMENTS = {  # name: -S overrides; exp-b shares exp-a's new Table 8 trial, both queued to run at once
    "exp-a": ["recipes.aggressive.weight_decay=0.04"],
    "exp-b": ["recipes.aggressive.weight_decay=0.04", "recipes.reid_scratch.lr=0.03"],
    "exp-t": ["recipes.reid_finetune.lr=0.0001"],
}


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args], cwd=repo,
                   check=True, capture_output=True, timeout=120)


def _stand_in(repo: Path, tmp: Path) -> None:
    """A git repository of this checkout's working files (not the editable install's), at the smallest scale
    that still runs every stage of dvc.yaml, with the MLflow store, checkpoints and Ray folder left relative."""
    repo.mkdir()
    for name in COPIED:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    relative = {"mlflow": params["mlflow"], "checkpoint_root": params["train"]["checkpoint_root"],
                "storage_path": params["ray"]["storage_path"]}
    params = _shrink(params, tmp)
    params["mlflow"] = relative["mlflow"]
    params["train"]["checkpoint_root"] = relative["checkpoint_root"]
    params["ray"]["storage_path"] = relative["storage_path"]
    params["ray"]["num_cpus"] = 1  # two experiments at once on a 2-core machine
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _git(repo, "init", "-q")
    subprocess.run(["dvc", "init", "-q"], cwd=repo, check=True, timeout=120, env=_env(""))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "stand-in")


def _env(tag: str) -> dict[str, str]:
    env = {**os.environ, TAG: tag, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for name in ("RAY_ADDRESS", "PYTHONPATH", "DVC_ROOT"):  # each stage must find its own code and root
        env.pop(name, None)
    return env


def _dvc(repo: Path, env: dict[str, str], *args: str, timeout: int = 900) -> str:
    proc = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _snapshot(repo: Path) -> dict[str, bytes]:
    """The main workspace's files an experiment must not touch: params, lock, results and reports."""
    files = [repo / "params.yaml", repo / "dvc.lock",
             *(p for folder in ("results", "reports") for p in sorted((repo / folder).rglob("*")) if p.is_file())]
    return {p.relative_to(repo).as_posix(): p.read_bytes() for p in files}


def _trial_ids(repo: Path, table: str) -> set[str]:
    """Every trial id `results/study/<table>.json` reports (a re-identification row has a scratch and a fine-tuning
    one)."""
    rows = json.loads((repo / "results" / "study" / f"{table}.json").read_text())["rows"]
    return {v for row in rows for run in row["runs"] for k, v in run.items() if k.endswith("trial_id")}


def _wait_for_queue(repo: Path, env: dict[str, str], deadline: float) -> str:
    while True:
        status = _dvc(repo, env, "queue", "status", timeout=120)
        if not any(word in status for word in ("Queued", "Running")):
            return status
        assert time.monotonic() < deadline, f"the queue did not finish:\n{status}"
        time.sleep(5)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_queued_and_temp_experiments_run_in_their_own_workspaces(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _stand_in(repo, tmp_path)
    tag = uuid.uuid4().hex
    env = _env(tag)
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    try:
        _dvc(repo, env, "repro")
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", "baseline")
        before, baseline = _snapshot(repo), {r.data.tags["trial_id"] for r in _trial_runs(uri)}
        assert baseline and "results/study/table8.json" in before and "reports/table9.md" in before

        for name in ("exp-a", "exp-b"):
            _dvc(repo, env, "exp", "run", "--queue", "-n", name, *(a for s in EXPERIMENTS[name] for a in ("-S", s)))
        _dvc(repo, env, "queue", "start", "-j", "2")
        status = _wait_for_queue(repo, env, time.monotonic() + 1200)
        assert status.count("Success") == 2, status
        _dvc(repo, env, "exp", "run", "--temp", "-n", "exp-t", *(a for s in EXPERIMENTS["exp-t"] for a in ("-S", s)))

        assert _snapshot(repo) == before, "an experiment changed the main workspace's files"
        runs = _trial_runs(uri)
        ids = [r.data.tags["trial_id"] for r in runs]
        assert len(ids) == len(set(ids)), "a trial trained twice (two experiments at once, or not reused)"
        assert all(r.info.status == "FINISHED" for r in runs)
        assert len(set(ids) - baseline) == 3, "each experiment trains only the trial its change makes new"
        trained_in = {r.data.tags["trial_id"]: r.data.tags.get("dvc_experiment") for r in runs}
        assert {trained_in[i] for i in baseline} == {None}, "dvc repro runs in no DVC experiment"
        assert {trained_in[i] for i in set(ids) - baseline} <= set(EXPERIMENTS), "a run names its DVC experiment"
        assert sorted(p.name for p in (repo / "checkpoints").iterdir()) == sorted(ids), "checkpoints are shared"
        assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db")), "an experiment made a store of its own"

        table8, table9 = _trial_ids(repo, "table8"), _trial_ids(repo, "table9")
        seen = {}
        for name, overrides in EXPERIMENTS.items():
            _dvc(repo, env, "exp", "apply", name)
            params = yaml.safe_load((repo / "params.yaml").read_text())
            for override in overrides:
                key, value = override.split("=")
                recipe, option = key.split(".")[1:]
                assert params["recipes"][recipe][option] == float(value), (name, override)
            seen[name] = (_trial_ids(repo, "table8"), _trial_ids(repo, "table9"))
            assert seen[name] != (table8, table9), f"{name}'s results are the baseline's"
        assert seen["exp-a"][0] == seen["exp-b"][0] != table8, "exp-a and exp-b share the new Table 8 trial"
        assert seen["exp-a"][1] == table9 != seen["exp-b"][1]
        assert seen["exp-t"] != seen["exp-b"] and seen["exp-t"][0] == table8
        _dvc(repo, env, "exp", "apply", "exp-t")
        assert "up to date" in _dvc(repo, env, "status")
    finally:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=repo, env=env, capture_output=True, timeout=120)
        _kill_tagged(tag)


def test_two_processes_needing_one_unfinished_trial_train_it_once(tiny_data: Path, tmp_path: Path) -> None:
    """Two experiments at once that need the same new trial (here two `train` commands started together, on one
    store and checkpoint folder): one trains it, the other waits for the trial's lock and reuses its run."""
    cmd = [sys.executable, "-m", "pipeline", "train", "--backbone", "resnet18", "--head", "kind=noah",
           "--recipe", "resnet", "--data", str(tiny_data), "--img-size", "32", "--epochs", "4", "--batch-size", "8",
           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--checkpoint-dir", str(tmp_path / "trial"),
           "--experiment", "shared", "--loader-workers", "0"]
    procs = [subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    waited = [e for e in errs if "another process is training it" in e]
    assert len(waited) == 1, errs
    runs = _trial_runs(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert f"reusing finished run {runs[0].info.run_id}" in waited[0]
