"""`dvc repro` killed mid-sweep and run again, in a clone of the repository (committed files only) with a
shrunken params.yaml: trials that had FINISHED are reused (same MLflow run, never trained again), the
killed trial resumes its own run, and reports/ holds every table. In the repository that leaves, DVC's own
views work: `dvc metrics show` lists every table's rows by name, `dvc exp show --csv` has their top-1,
`dvc plots show` draws the learning curves, and an experiment that sets one row's option with `-S` is named by
that row in `dvc params diff`."""
from __future__ import annotations

import copy
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from pipeline import REPO_ROOT
from pipeline.config import load_params

pytestmark = pytest.mark.slow

TABLES = load_params().study.tables  # what `dvc repro` trains
BASELINE = {"row": 1, "backbone": "resnet18", "head": {"kind": "baseline"}}
NOAH = {"row": 2, "backbone": "resnet18", "head": {"kind": "noah", "N": 4, "r": 0.5}}
TAG = "NOAH_RELIABILITY_DVC"


def _shrink(params: dict, tmp: Path) -> dict:
    """Every table at one resnet18 row (Tables 4 and 11: baseline and NOAH, the pair the figures need), tiny built-in
    data at 32 px, one epoch, Table 10 on resnet18 only; the MLflow store and checkpoints outside the clone."""
    tiny = {"num_classes": 4, "train_per_class": 8, "val_per_class": 4, "image_size": 40, "train_ids": 4,
            "test_ids": 4, "cameras": 2, "images_per_id": 2, "distractors": 2, "junk": 2}
    params["profile"] = "smoke"
    params["seeds"] = [0]
    params["profiles"]["smoke"] = {"dataset": "builtin", "reid_dataset": "builtin_reid", "img_size": 32,
                                   "reid_img_size": 32, "resnet_width": params["profiles"]["smoke"]["resnet_width"],
                                   "epochs": 1, "batch_size": 16,
                                   "recipes": params["profiles"]["smoke"]["recipes"], "seeds": None}
    params["datasets"]["builtin"] = {"source": "builtin", "out": "data/smoke/builtin", "resize": 40, "builtin": tiny}
    params["datasets"]["builtin_reid"] = {"source": "builtin_reid", "out": "data/smoke/builtin_reid", "resize": 32,
                                          "builtin": tiny}
    params["mlflow"] = {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"}
    params["ray"].update(num_cpus=2, max_concurrent=1, storage_path=str(tmp / "ray_results"))
    params["train"] = {**params.get("train", {}), "checkpoint_root": str(tmp / "checkpoints"), "progress": "line"}
    params["benchmark"] = {**params.get("benchmark", {}), "backbones": ["resnet18"], "cpu_repeats": 2,
                           "cpu_warmup": 0, "img_size": 32}
    for name, table in params["tables"].items():
        rows = {"baseline": BASELINE, **({"noah": NOAH} if name in ("table4", "table11") else {})}
        table["rows"] = copy.deepcopy(rows)  # one object per table: YAML anchors and aliases would tie them for -S
    return params


def _trial_runs(uri: str) -> list:
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(ids, max_results=1000) if "trial_id" in r.data.tags] if ids else []


def _kill_tagged(tag: str) -> None:
    """SIGKILL every process left over from the killed `dvc repro` (they carry TAG in their environment)."""
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(TAG) == tag:
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


@dataclass
class Reproduced:
    """The clone after a `dvc repro` killed once a trial had finished, and a second one run to the end."""

    repo: Path
    env: dict[str, str]
    uri: str
    before: dict  # trial id -> its MLflow run when the first `dvc repro` was killed
    second: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Reproduced:
    tmp_path = tmp_path_factory.mktemp("dvc")
    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(repo)], check=True, timeout=120)
    for committed in (repo / "reports").glob("table*"):  # the clone's reports must come from this study
        committed.unlink()
    params = _shrink(yaml.safe_load((repo / "params.yaml").read_text()), tmp_path)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    uri = params["mlflow"]["tracking_uri"]
    tag = uuid.uuid4().hex
    env = {**os.environ, TAG: tag, "PYTHONPATH": str(repo),  # the clone's package, not the installed one
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           **{f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
              for what, value in (("NAME", "test"), ("EMAIL", "test@localhost"))}}
    env.pop("RAY_ADDRESS", None)

    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not any(r.info.status == "FINISHED" for r in _trial_runs(uri)):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished"
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        _kill_tagged(tag)
    before = {r.data.tags["trial_id"]: r for r in _trial_runs(uri)}
    assert not (repo / "reports" / "table4.md").exists(), "killed mid-study"
    second = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    _kill_tagged(tag)
    return Reproduced(repo, env, uri, before, second)


def test_interrupted_dvc_repro_reuses_finished_trials(reproduced: Reproduced) -> None:
    repo, env, uri, before, second = (reproduced.repo, reproduced.env, reproduced.uri, reproduced.before,
                                      reproduced.second)
    done = {k: r for k, r in before.items() if r.info.status == "FINISHED"}
    assert done, "a trial had finished when the first `dvc repro` was killed"
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    after = _trial_runs(uri)
    ids = [r.data.tags["trial_id"] for r in after]
    assert len(ids) == len(set(ids)), "one MLflow run per trial, never a second"
    assert all(r.info.status == "FINISHED" for r in after)
    by_id = {r.data.tags["trial_id"]: r for r in after}
    for key, run in done.items():  # reused, not retrained: same run, untouched since it finished
        assert by_id[key].info.run_id == run.info.run_id
        assert by_id[key].info.end_time == run.info.end_time
        assert by_id[key].data.metrics == run.data.metrics
    for key, run in before.items():  # the trial killed mid-training resumed its own run
        assert by_id[key].info.run_id == run.info.run_id
    assert "already finished" in second.stderr or "already finished" in second.stdout
    for table in (*TABLES, "table10"):
        for suffix in ("md", "csv"):
            assert (repo / "reports" / f"{table}.{suffix}").stat().st_size > 0, (table, suffix)
    assert (repo / "reports" / "README.md").is_file()
    status = subprocess.run(["dvc", "status"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert "up to date" in status.stdout, status.stdout


def _dvc(reproduced: Reproduced, *args: str) -> str:
    proc = subprocess.run(["dvc", *args], cwd=reproduced.repo, env=reproduced.env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "failed" not in proc.stderr.lower(), f"dvc {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def test_dvc_metrics_plots_and_experiments_show_every_row_by_name(reproduced: Reproduced, tmp_path: Path) -> None:
    assert reproduced.second.returncode == 0, reproduced.second.stderr[-4000:]
    repo, env = reproduced.repo, reproduced.env
    params = yaml.safe_load((repo / "params.yaml").read_text())
    rows = {t: list(params["tables"][t]["rows"]) for t in TABLES} | {"table10": params["benchmark"]["backbones"]}
    subprocess.run(["git", "add", "-A"], cwd=repo, env=env, check=True, timeout=60)
    subprocess.run(["git", "commit", "-qm", "the study"], cwd=repo, env=env, check=True, timeout=60)

    files = json.loads(_dvc(reproduced, "metrics", "show", "--json"))[""]["data"]  # the workspace's, per file
    metrics = {table: by_row for file in files.values() for table, by_row in file["data"].items()}
    assert {table: list(by_row) for table, by_row in metrics.items()} == rows, "every table's rows, by name"
    for table, by_row in metrics.items():
        wanted = {"table9": {"scratch_top1", "scratch_map", "finetune_top1", "finetune_map"},
                  "table10": {"cpu_overhead_pct"}}.get(table, {"top1", "top5"})
        assert all(set(values) == wanted for values in by_row.values()), (table, by_row)

    shown = list(csv.DictReader(io.StringIO(_dvc(reproduced, "exp", "show", "--csv"))))
    top1 = {c for c in shown[0] if c.endswith(".top1")}
    assert top1 == {f"{t}.{n}.top1" for t in TABLES if t != "table9" for n in rows[t]}
    assert all(0 <= float(r[c]) <= 100 for r in shown for c in top1), "the workspace's and HEAD's top-1 of every row"

    _dvc(reproduced, "plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    assert all(f"reports/plots/curves/{t}.csv" in html and "val_top1" in html for t in TABLES)
    plots = json.loads(_dvc(reproduced, "plots", "show", "--json"))["data"]
    lines = {t: {p["row"] for p in plots[f"reports/plots/curves/{t}.csv"][0]["content"]["data"]["values"]}
             for t in ("table4", "table9")}
    assert lines == {"table4": {"baseline", "noah"}, "table9": {"baseline scratch", "baseline finetune"}}

    _dvc(reproduced, "exp", "run", "-S", "tables.table4.rows.noah.head.r=0.25")  # one row's option, by its name
    diff = json.loads(_dvc(reproduced, "params", "diff", "--json"))
    assert {key: (d["old"], d["new"]) for key, d in diff["params.yaml"].items()} == \
        {"tables.table4.rows.noah.head.r": (0.5, 0.25)} and list(diff) == ["params.yaml"]
    shown = list(csv.DictReader(io.StringIO(_dvc(reproduced, "exp", "show", "--csv"))))
    assert [r["Experiment"] != "" for r in shown] == [False, False, True], "workspace, HEAD, the experiment"
    assert 0 <= float(shown[2]["table4.noah.top1"]) <= 100
