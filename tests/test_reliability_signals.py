"""An interrupted study never looks finished: Ctrl-C (once or twice), SIGTERM to the stage and SIGTERM to its
whole process group (GNU `timeout`, a scheduler), sent to a real `stages/study.py` on a local Ray training a
real trial into a temporary SQLite store. Each ends in seconds with 128 + the signal, writes no results file
(DVC would lock a partial study), leaves no MLflow run RUNNING (the trial's and the sweep's end KILLED with
the reason), and the next run resumes the trial into the same run and finishes. Runs left RUNNING by a
process that died are ended by the next study unless a live process holds their trial's lock."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline import REPO_ROOT
from pipeline.config import RESULTS, load_params
from pipeline.study.rows import study_trials, table_rows
from pipeline.study.sweep import end_stale_runs
from pipeline.training.record import checkpoint_root, trial_lock
from pipeline.training.tracking import REASON_TAG, experiment_id

TABLE = "tsignal"
EPOCHS = 6  # the signal comes after epoch 1: time to spare before the trial would finish
ROWS = {"baseline": {"row": 1, "backbone": "resnet18", "head": {"kind": "baseline"}}}
EXIT_WITHIN = 30.0  # seconds from the signal; a process-group SIGTERM took a minute while the GCS got it too


def _results() -> dict[str, tuple[int, int]]:
    """Every file under results/ with its size and modification time."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in RESULTS.glob("*")}


def _stage(params: Path, log: Path) -> subprocess.Popen:
    """`stages/study.py TABLE` in a session of its own: a group signal reaches it and what it starts, not pytest."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "stages/study.py", "--params", str(params), TABLE], cwd=REPO_ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _interrupt(params: Path, log: Path, signum: int, times: int, group: bool) -> tuple[int, float]:
    """Run the stage until its trial has finished epoch 1, then send `signum` `times` times (a second apart)
    to it or its process group; returns its exit code and the seconds from the first signal to its exit."""
    proc = _stage(params, log)
    try:
        deadline = time.monotonic() + 300
        while f"epoch 1/{EPOCHS}" not in log.read_text():  # the console's line once epoch 1 is checkpointed
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the trial never finished its first epoch"
            time.sleep(0.1)
        sent = time.monotonic()
        for _ in range(times):
            (os.killpg if group else os.kill)(proc.pid, signum)
            time.sleep(1)
        proc.wait(timeout=120)
        return proc.returncode, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _runs(client: MlflowClient) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture
def signal_params(tiny_params: Callable[..., Path]) -> Iterator[Path]:
    """A one-row table of one resnet18 trial of EPOCHS epochs; its results files are removed afterwards."""
    yield tiny_params(profiles={"smoke": {"epochs": EPOCHS}}, tables={TABLE: {"recipe": "resnet", "rows": ROWS}})
    for suffix in ("json", "csv"):
        (RESULTS / f"{TABLE}.{suffix}").unlink(missing_ok=True)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "times", "group"), [
    (signal.SIGINT, 1, False),  # `kill -INT`
    (signal.SIGINT, 2, True),  # Ctrl-C twice in a terminal: the foreground process group
    (signal.SIGTERM, 1, False),  # `kill`, DVC ending its stage
    (signal.SIGTERM, 1, True),  # GNU `timeout`, a cluster scheduler
], ids=["sigint", "sigint-twice-group", "sigterm", "sigterm-group"])
def test_an_interrupted_study_exits_non_zero_writes_no_results_and_kills_its_runs(
        signal_params: Path, tmp_path: Path, signum: int, times: int, group: bool) -> None:
    client = MlflowClient(load_params(signal_params).mlflow.tracking_uri)
    before = _results()
    log = tmp_path / "study.log"
    code, seconds = _interrupt(signal_params, log, signum, times, group)
    output = log.read_text()
    assert code == 128 + signum, output[-3000:]
    assert f"error: interrupted by {signal.Signals(signum).name}" in output, output[-3000:]
    assert seconds < EXIT_WITHIN, f"exited {seconds:.0f}s after the signal"
    assert _results() == before, "no results file written or changed"
    runs = _runs(client)
    assert sorted(("sweep" in r.data.tags, r.info.status) for r in runs) == [(False, "KILLED"), (True, "KILLED")]
    assert all(r.data.tags[REASON_TAG].startswith("interrupted") for r in runs), [r.data.tags for r in runs]


@pytest.mark.slow
def test_the_next_study_resumes_an_interrupted_one_and_finishes(signal_params: Path, tmp_path: Path) -> None:
    client = MlflowClient(load_params(signal_params).mlflow.tracking_uri)
    assert _interrupt(signal_params, tmp_path / "first.log", signal.SIGTERM, 1, True)[0] == 128 + signal.SIGTERM
    (killed,) = [r for r in _runs(client) if "trial_id" in r.data.tags]
    done = [m.step for m in client.get_metric_history(killed.info.run_id, "val_top1")]
    assert done and len(done) < EPOCHS

    proc = _stage(signal_params, tmp_path / "second.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    ((row,),) = [r["runs"] for r in json.loads((RESULTS / f"{TABLE}.json").read_text())["rows"]]
    assert row["status"] == "FINISHED" and row["run_id"] == killed.info.run_id, "resumed into the same run"
    steps = sorted(m.step for m in client.get_metric_history(killed.info.run_id, "val_top1"))
    assert steps == list(range(EPOCHS)), "every epoch once: resumed from the checkpoint, not retrained"
    runs = _runs(client)
    assert not [r for r in runs if r.info.status != "FINISHED"], [(r.info.run_name, r.info.status) for r in runs]
    assert all(REASON_TAG not in r.data.tags for r in runs), "the reopened runs lost their old reason"


def test_the_next_study_ends_stale_running_runs_of_its_trials_unless_a_process_holds_them(
        signal_params: Path) -> None:
    """Runs left RUNNING by a process that died (SIGKILL, a lost node) are ended KILLED with the reason; one
    whose trial's lock a live process holds (another experiment training it now) is left RUNNING."""
    params = load_params(signal_params)
    uri = params.mlflow.tracking_uri
    client = MlflowClient(uri)
    (st,) = study_trials({TABLE: table_rows(params, TABLE)}, frozenset()).values()
    exp = experiment_id(client, TABLE)
    stale = client.create_run(exp, tags={"trial_id": st.key}).info.run_id
    with trial_lock(checkpoint_root(params.train.checkpoint_root) / st.key, st.label):
        end_stale_runs(params, uri, [st])  # held by this process's open of the lock: a live trainer
    assert client.get_run(stale).info.status == "RUNNING"
    end_stale_runs(params, uri, [st])
    ended = client.get_run(stale)
    assert ended.info.status == "KILLED" and "no process training it" in ended.data.tags[REASON_TAG]
