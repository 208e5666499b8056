"""The pre-flight of every command that writes (issue 32): an unusable store, folder, name, head or batch is one
line and exit 2 before anything is created; a locked SQLite store is waited for, before and during a trial; a
diverging training and a failed checkpoint write end in one line; free text in reports is escaped; a YAML error
points where its open bracket began. Real processes (`python -m pipeline …`, the stages) and real MLflow stores."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from tracking_server import free_port

from pipeline import REPO_ROOT
from pipeline.config import ConfigError, MlflowConfig, TrainConfig, load_params
from pipeline.report.render import Footnotes
from pipeline.training import tracking
from pipeline.training.record import CHECKPOINT
from pipeline.training.run import run_trial
from pipeline.training.trial import resolve_trial

TRAIN = ["train", "--backbone", "resnet18", "--img-size", "32", "--epochs", "1", "--batch-size", "16"]


def _pipeline(*args: str, **popen: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, list[str]]:
    """Exit code and stderr lines of a process started by `_pipeline`."""
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.splitlines()


def _one_line(code: int, lines: list[str], *expected: str) -> None:
    """Exit 2, at most three stderr lines, no traceback, the last line an error naming `expected`."""
    shown = "\n".join(lines)
    assert code == 2 and len(lines) <= 3 and "Traceback" not in shown, shown
    assert lines[-1].startswith("error: ") and all(e in lines[-1] for e in expected), shown


@pytest.fixture
def refused(tiny_params: Callable[..., Path], tmp_path: Path) -> Path:
    """A params file whose store and checkpoint root lie in `tmp_path`, and a file there that is not a database."""
    (tmp_path / "not.db").write_text("not a database\n")
    return tiny_params()


@pytest.mark.slow
def test_commands_refuse_an_unusable_store_folder_or_name_in_one_line_creating_nothing(
        refused: Path, tiny_data: Path, tmp_path: Path) -> None:
    train = [*TRAIN, "--data", str(tiny_data), "--params", str(refused)]
    cases = {  # the command, and what its one line names
        "checkpoint dir": ([*train, "--checkpoint-dir", "/proc/nope/ck"], ["--checkpoint-dir", "write"]),
        "store folder": ([*train, "--tracking-uri", "sqlite:////proc/nope/m.db"], ["--tracking-uri", "/proc/nope"]),
        "scheme": ([*train, "--tracking-uri", "ftp://nowhere"], ["--tracking-uri", "sqlite:///FILE"]),
        "not a database": ([*train, "--tracking-uri", f"sqlite:///{tmp_path / 'not.db'}"], ["not one"]),
        "no server": ([*train, "--tracking-uri", f"http://127.0.0.1:{free_port()}"], ["does not answer"]),
        "experiment path": ([*train, "--experiment", "../../../../x"], ["--experiment", "no `/`, `..` or `#`"]),
        "experiment #": ([*train, "--experiment", "a#b"], ["--experiment"]),
        "head": ([*train, "--head", "kind=noah,N=3"], ["head.N", "divisor"]),
        "batch of one": ([*train, "--batch-size", "1"], ["batch_size", "BatchNorm"]),  # the last one counts
        "report out": (["report", "--results", str(tmp_path / "r"), "--out", "/proc/nope/reports"], ["reports"]),
        "report store": (["report", "--results", str(tmp_path / "r"), "--out", str(tmp_path / "reports"),
                          "--tracking-uri", "ftp://x"], ["mlflow.tracking_uri"]),
        "benchmark": (["benchmark", "--backbones", "resnet18", "--out", "/proc/nope/t10"], ["benchmark.out"]),
        "prepare": (["prepare", "--source", "builtin", "--out", "/proc/nope/data"], ["out", "write"]),
    }
    procs = {name: _pipeline(*cmd) for name, (cmd, _) in cases.items()}  # at once: each pays its imports
    for name, proc in procs.items():
        _one_line(*_finish(proc), *cases[name][1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not.db", "params.yaml"]  # no store, no checkpoints/


@pytest.mark.slow
def test_clean_refuses_an_unusable_store(tiny_params: Callable[..., Path], tmp_path: Path) -> None:
    params = tiny_params(mlflow={"tracking_uri": "sqlite:////proc/nope/m.db"})
    _one_line(*_finish(_pipeline("clean", "--params", str(params))), "mlflow.tracking_uri")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.slow
def test_the_study_stage_refuses_a_bad_store_leaving_no_empty_folders(tiny_params: Callable[..., Path],
                                                                       tmp_path: Path) -> None:
    params = tiny_params(mlflow={"tracking_uri": "ftp://nowhere"})
    proc = subprocess.Popen([sys.executable, "stages/study.py", "--params", str(params), "table7"], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _one_line(*_finish(proc), "mlflow.tracking_uri")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no checkpoints/, ray_results/


def _repo_params(tmp_path: Path, edit: Callable[[dict], None]) -> Path:
    data = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    edit(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("section", ["tables", "profiles", "datasets", "recipes"])
def test_a_name_that_would_leave_its_folder_is_refused(tmp_path: Path, section: str) -> None:
    path = _repo_params(tmp_path, lambda d: d[section].update({"../../evil": next(iter(d[section].values()))}))
    with pytest.raises(ConfigError, match=r"no `/`, `\.\.` or `#`") as err:
        load_params(path)
    assert err.value.key == f"{section}.../../evil"


@pytest.mark.parametrize(("key", "value"), [("train", {"checkpoint_root": "a/../../x"}),
                                            ("ray", {"storage_path": "../x"}),
                                            ("mlflow", {"tracking_uri": "sqlite:///../m.db"}),
                                            ("benchmark", {"out": "../../t10"})])
def test_a_relative_path_that_climbs_out_of_the_repository_is_refused(tmp_path: Path, key: str,
                                                                      value: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="no `..` above it"):
        load_params(_repo_params(tmp_path, lambda d: d[key].update(value)))
    load_params(_repo_params(tmp_path, lambda d: d[key].update(dict.fromkeys(value, "/abs/x"))))  # taken as given


@pytest.mark.slow
def test_the_study_stage_refuses_a_table_named_like_a_path(tmp_path: Path) -> None:
    path = _repo_params(tmp_path, lambda d: d["tables"].update({"../../evil": d["tables"]["table7"]}))
    proc = subprocess.Popen([sys.executable, "stages/study.py", "--params", str(path), "../../evil"], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _one_line(*_finish(proc), "tables.../../evil")
    assert not (REPO_ROOT.parent / "evil").exists()


def test_free_text_in_a_report_is_plain_text() -> None:
    notes = Footnotes()
    notes.mark('<img src=x onerror="alert(1)"> [click](javascript:alert(1)) ![i](http://e.example/x.png) `c` | a\nb', 1)
    text = notes.markdown()
    assert "<" not in text and "](" not in text.replace("\\](", "") and "\n" not in text
    assert text == ('1. &lt;img src=x onerror="alert(1)"&gt; \\[click\\](javascript:alert(1)) !\\[i\\]'
                    '(http://e.example/x.png) `c` \\| a b (paper row 1)')


def test_a_yaml_error_points_where_the_bracket_opened(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("profile: smoke\nseeds: [0, 1\nmlflow:\n  tracking_uri: x\n")
    with pytest.raises(ConfigError, match=r"flow sequence opened at line 2, column 8") as err:
        load_params(path)
    assert "\n" not in str(err.value)


@pytest.fixture
def locked_store(tmp_path: Path) -> Iterator[Callable[[float, float], subprocess.Popen]]:
    """Start a process that holds `mlflow.db` in `tmp_path` exclusively locked for `hold` s after `delay` s."""
    holders = []
    code = ("import sqlite3, sys, time; time.sleep(float(sys.argv[2])); c = sqlite3.connect(sys.argv[1], "
            "isolation_level=None); c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); "
            "time.sleep(float(sys.argv[3]))")

    def hold(delay: float, seconds: float) -> subprocess.Popen:
        holders.append(subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "mlflow.db"), str(delay),
                                         str(seconds)], stdout=subprocess.PIPE, text=True))
        return holders[-1]

    yield hold
    for proc in holders:
        proc.kill()
        proc.wait()


def _new_store(tmp_path: Path) -> MlflowClient:
    mlflow_client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow_client.search_experiments()  # the tables exist: what the lock holds is a store in use
    return mlflow_client


@pytest.mark.slow
def test_a_locked_store_is_waited_for_before_and_during_a_trial(tiny_params: Callable[..., Path], tiny_data: Path,
                                                               tmp_path: Path,
                                                               locked_store: Callable[..., subprocess.Popen]) -> None:
    mlflow_client = _new_store(tmp_path)
    assert locked_store(0, 40).stdout.readline() == "locked\n"  # held past MLflow's own 20 s wait, before train
    proc = _pipeline(*TRAIN[:-4], "--epochs", "3", "--batch-size", "16", "--data", str(tiny_data),
                     "--params", str(tiny_params()))
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:  # held again for 60 s once epoch 1 is logged: epoch 2's logging meets it
        lines.append(line.rstrip("\n"))
        if "epoch 1/3" in line:
            assert locked_store(0, 60).stdout.readline() == "locked\n"
    assert proc.wait(timeout=600) == 0, "\n".join(lines)
    shown = "\n".join(lines)
    assert "Traceback" not in shown and sum("is locked by another process: waiting up to" in ln for ln in lines) == 2
    run_id = json.loads(proc.stdout.read())["run_id"]
    assert mlflow_client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in mlflow_client.get_metric_history(run_id, "val_top1")) == [0, 1, 2]


@pytest.mark.slow
def test_a_store_locked_past_the_wait_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         locked_store: Callable[..., subprocess.Popen]) -> None:
    _new_store(tmp_path)
    monkeypatch.setattr(tracking, "LOCK_WAIT", 1.0)
    assert locked_store(0, 120).stdout.readline() == "locked\n"
    with pytest.raises(ConfigError, match="locked for over 1 s") as err:
        tracking.check_store(f"sqlite:///{tmp_path / 'mlflow.db'}", "mlflow.tracking_uri")
    assert err.value.key == "mlflow.tracking_uri" and "\n" not in str(err.value)


def _limit_files(size: int) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


@pytest.mark.slow
def test_a_diverging_training_and_a_failed_checkpoint_write_are_one_line(tiny_params: Callable[..., Path],
                                                                        tiny_data: Path, tmp_path: Path) -> None:
    base = [*TRAIN, "--data", str(tiny_data)]
    diverging = tiny_params(recipes={"resnet": {"lr": 1e30}})
    code, lines = _finish(_pipeline(*base, "--params", str(diverging), "--checkpoint-dir", str(tmp_path / "d")))
    _one_line(code, lines, "diverged", "FAILED")
    # a file-size limit above the store's size, below the checkpoint's (resnet18: 45 MB)
    code, lines = _finish(_pipeline(*base, "--params", str(tiny_params()), "--checkpoint-dir", str(tmp_path / "f"),
                                    preexec_fn=_limit_files(20 << 20)))
    _one_line(code, lines, "File too large", str(tmp_path / "f" / CHECKPOINT))
    assert not [p.name for p in (tmp_path / "f").iterdir() if "last.pt" in p.name]  # no partial file


def test_a_trial_resumed_after_its_last_epoch_says_so(tiny_data: Path, tmp_path: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    trial = resolve_trial({"backbone": "resnet18", "head": {"kind": "baseline"}, "recipe": "resnet",
                           "data_dir": str(tiny_data), "img_size": 32, "epochs": 1, "batch_size": 16},
                          load_params().recipes)
    store = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")

    class Killed(Exception):
        pass

    def killed(_: dict[str, float]) -> None:  # after the last epoch's checkpoint, before the run is finished
        raise Killed

    with pytest.raises(Killed):
        run_trial(trial, train=TrainConfig(progress="off"), tracking=store, checkpoint_dir=tmp_path / "c",
                  on_epoch=killed)
    capfd.readouterr()
    assert run_trial(trial, train=TrainConfig(progress="off"), tracking=store,
                     checkpoint_dir=tmp_path / "c")["status"] == "FINISHED"
    err = capfd.readouterr().err
    assert "after its last epoch (1/1): recording its result" in err and "epoch 2/1" not in err
