"""Bad params and unusable outputs, met the way a user meets them: through the stages and the CLI. Each
fails in seconds with one short line naming the key, before Ray, MLflow or any data is touched, and a
sweep whose trials did not finish exits non-zero with their reasons in the results."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from pipeline import REPO_ROOT
from pipeline.config import MAX_SHOWN, PARAMS, ConfigError, load_params, parse_head
from pipeline.study.sweep import run_study

pytestmark = pytest.mark.slow

ROW = {"row": 1, "backbone": "resnet18", "head": {"kind": "baseline"}}
ROWS = {"baseline": ROW}  # a table of that one row


def _repo_params(tmp_path: Path, **changes: object) -> Path:
    """The repository's params.yaml with top-level `changes`, tracked in a temporary store."""
    data = yaml.safe_load(PARAMS.read_text())
    data["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data.update(changes)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _stage(stage: str, params: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"stages/{stage}.py", "--params", str(params), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess, key: str, code: int = 2) -> str:
    assert proc.returncode == code, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}"), proc.stderr
    return lines[0]


# ---- params.yaml


def test_yaml_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    """Nine levels of nine aliases would expand to 9**9 strings: the file is refused, not expanded."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\nprofile: *a8\n")
    start = time.monotonic()
    proc = _stage("study", path, "table4", timeout=60)
    line = _one_error_line(proc, "params")
    assert "aliases" in line and len(line) < 1000
    assert time.monotonic() - start < 30


def test_a_row_name_given_twice_is_refused(tmp_path: Path) -> None:
    """Plain YAML keeps the last of two equal keys: a table's second `max:` row would replace the first unseen."""
    text = PARAMS.read_text()
    row = next(line for line in text.splitlines() if line.strip().startswith("max: {row: 3"))
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(row, f"{row}\n{row.replace('aggregation: max', 'aggregation: avg')}"))
    line = _one_error_line(_stage("study", path, "table7", timeout=60), "params")
    assert "found the key 'max' twice" in line, line


def test_error_messages_show_a_long_value_cut(tmp_path: Path) -> None:
    proc = _stage("prepare", _repo_params(tmp_path, seed=list(range(5000))))
    line = _one_error_line(proc, "seed")
    assert "characters)" in line and len(line) < MAX_SHOWN + 300


@pytest.mark.parametrize("seed", [2**70, -1])
def test_train_cli_bounds_the_seed_before_any_run_exists(tmp_path: Path, tiny_data: Path, seed: int) -> None:
    db = tmp_path / "mlflow.db"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--backbone", "resnet18", "--data",
                           str(tiny_data), "--seed", str(seed), "--img-size", "32", "--epochs", "1",
                           "--tracking-uri", f"sqlite:///{db}", "--checkpoint-dir", str(tmp_path / "ckpt")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert "2**32 - 1" in _one_error_line(proc, "trial.seed")
    assert not db.exists() and not (tmp_path / "ckpt").exists()


def test_train_deterministic_takes_true_or_false_and_a_bad_value_stops_train_before_any_run(
        tmp_path: Path, tiny_data: Path) -> None:
    train = yaml.safe_load(PARAMS.read_text())["train"]
    assert load_params(_repo_params(tmp_path, train={**train, "deterministic": True})).train.deterministic is True
    assert load_params(_repo_params(tmp_path, train=train)).train.deterministic is False  # the repository's
    bad = _repo_params(tmp_path, train={**train, "deterministic": "yes"})
    with pytest.raises(ConfigError) as err:
        load_params(bad)
    assert err.value.key == "train.deterministic"
    db = tmp_path / "mlflow.db"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--backbone", "resnet18", "--data",
                           str(tiny_data), "--img-size", "32", "--epochs", "1", "--params", str(bad),
                           "--checkpoint-dir", str(tmp_path / "ckpt")], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert "true or false" in _one_error_line(proc, "train.deterministic")
    assert not db.exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("value", ["auto", "yes", 1])
def test_train_compile_takes_true_false_or_null(tmp_path: Path, value: object) -> None:
    train = yaml.safe_load(PARAMS.read_text())["train"]
    assert load_params(_repo_params(tmp_path, train=train)).train.compile is None  # the repository's: auto
    assert load_params(_repo_params(tmp_path, train={**train, "compile": False})).train.compile is False
    with pytest.raises(ConfigError, match=r"train.compile: got .*; allowed: true, false or null \(null: compile on"):
        load_params(_repo_params(tmp_path, train={**train, "compile": value}))


@pytest.mark.parametrize("value", ["fast", "GPU", 1, None])
def test_train_decode_takes_one_of_its_words_and_a_bad_one_names_them(tmp_path: Path, value: object) -> None:
    """A Literal field: the error names the key, the value given and every word allowed."""
    train = yaml.safe_load(PARAMS.read_text())["train"]
    assert load_params(_repo_params(tmp_path, train={**train, "decode": "cpu"})).train.decode == "cpu"
    with pytest.raises(ConfigError) as err:
        load_params(_repo_params(tmp_path, train={**train, "decode": value}))
    assert str(err.value) == f"train.decode: got {value!r}; allowed: one of 'auto', 'cpu', 'gpu'"


@pytest.mark.parametrize("value", [True, 1.0, 2, "3"])
def test_a_literal_number_takes_that_number_alone(value: object) -> None:
    """`kernel_size: Literal[1, 3]`: true equals 1 and 1.0 equals 1 in Python, but neither is the option's 1."""
    assert parse_head({"kernel_size": 3}).kernel_size == 3
    with pytest.raises(ConfigError, match=rf"^head.kernel_size: got {value!r}; allowed: one of 1, 3$"):
        parse_head({"kernel_size": value})


def test_builtin_data_seed_is_bounded_in_the_prepare_stage(tmp_path: Path) -> None:
    out = tmp_path / "out"
    datasets = {"builtin": {"source": "builtin", "out": str(out), "builtin": {"seed": -1}}}
    proc = _stage("prepare", _repo_params(tmp_path, datasets={**yaml.safe_load(PARAMS.read_text())["datasets"],
                                                               **datasets}), "builtin")
    _one_error_line(proc, "datasets.builtin.builtin.seed")
    assert not out.exists()


def test_profile_image_size_is_checked_where_it_is_set(tmp_path: Path) -> None:
    profiles = yaml.safe_load(PARAMS.read_text())["profiles"]
    profiles["smoke"]["img_size"] = 40
    proc = _stage("study", _repo_params(tmp_path, profiles=profiles), "table6")
    assert "a multiple of 16" in _one_error_line(proc, "profiles.smoke.img_size")


def test_dataset_out_cannot_climb_out_of_its_profile_folder(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    datasets = yaml.safe_load(PARAMS.read_text())["datasets"]
    escape = os.path.relpath(victim, REPO_ROOT / "data" / "smoke")
    datasets["builtin"]["out"] = f"data/smoke/{escape}"
    proc = _stage("prepare", _repo_params(tmp_path, datasets=datasets))
    assert "under data/smoke/" in _one_error_line(proc, "datasets.builtin.out")
    assert [p.name for p in victim.iterdir()] == ["keep.txt"] and (victim / "keep.txt").read_text() == "mine"


def test_plan_takes_tables_of_any_name(tmp_path: Path) -> None:
    tables = yaml.safe_load(PARAMS.read_text())["tables"]
    tables = {"extra": {"recipe": "resnet", "rows": ROWS}, "table10b": {"recipe": "resnet", "rows": ROWS},
              **{k: tables[k] for k in ("table6", "table11", "proxy")}}  # proxy: its profile's, not planned here
    params = str(_repo_params(tmp_path, tables=tables, study={"tables": ["table6", "table11"]}))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--params", params,
                           "--json"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert list(json.loads(proc.stdout)["tables"]) == ["table6", "table10", "table11", "extra", "table10b"]


# ---- the study stage: ready before Ray starts; a failed trial is a row without a result


def test_study_stage_with_unprepared_data_fails_before_ray(tiny_params: Callable[..., Path], tmp_path: Path) -> None:
    path = tiny_params(datasets={"builtin": {"out": str(tmp_path / "not-prepared")}},
                       tables={"tmiss": {"recipe": "resnet", "rows": ROWS}})
    start = time.monotonic()
    proc = _stage("study", path, "tmiss")
    line = _one_error_line(proc, "datasets.builtin.out")
    assert "a prepared dataset folder" in line and str(tmp_path / "not-prepared") in line
    assert time.monotonic() - start < 30, "failed before Ray started"
    assert "Ray" not in proc.stderr and not (tmp_path / "ray_results").exists()
    assert not (REPO_ROOT / "results" / "tmiss.json").exists()


def test_study_stage_with_shards_cut_short_fails_before_ray(tiny_params: Callable[..., Path], tiny_data: Path,
                                                            tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    shutil.copytree(tiny_data, cut)
    os.truncate(next((cut / "shards").glob("train-*.tar")), 4000)
    path = tiny_params(datasets={"builtin": {"out": str(cut)}}, tables={"tcut": {"recipe": "resnet", "rows": ROWS}})
    line = _one_error_line(_stage("study", path, "tcut"), "datasets.builtin.out")
    assert "manifest needs at least" in line and "prepare the dataset again" in line
    assert "Ray" not in line and not (tmp_path / "ray_results").exists()


@contextmanager
def _read_only_mount(folder: Path) -> Iterator[None]:
    """A read-only file system at `folder` (root ignores permission bits, not a read-only mount)."""
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("what", ["results", "checkpoints", "mlflow"])
def test_read_only_outputs_fail_before_ray_and_name_the_key(tiny_params: Callable[..., Path], tmp_path: Path,
                                                            what: str) -> None:
    folder = tmp_path / "ro"
    changes = {"checkpoints": {"train": {"checkpoint_root": str(folder)}},
               "mlflow": {"mlflow": {"tracking_uri": f"sqlite:///{folder / 'mlflow.db'}"}}}.get(what, {})
    params = load_params(tiny_params(tables={"tro": {"recipe": "resnet", "rows": ROWS}}, **changes))
    key = {"results": "results", "checkpoints": "train.checkpoint_root", "mlflow": "mlflow.tracking_uri"}[what]
    with _read_only_mount(folder):
        start = time.monotonic()
        with pytest.raises(ConfigError) as err:
            run_study(params, ["tro"], folder if what == "results" else tmp_path / "results")
    assert err.value.key == key and ("Read-only file system" in str(err.value) or what == "mlflow"), str(err.value)
    assert time.monotonic() - start < 30 and not list(tmp_path.glob("ray_results/*")), "failed before Ray started"


def test_a_trial_failing_inside_ray_is_a_row_without_result_and_listed_at_the_end(
        tiny_params: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An odd batch cannot be mixed up in pairs: the trial fails before its MLflow run exists. The study still
    writes its results (the row carries Ray's error, the report will show "—") and lists the failure at the end."""
    params = load_params(tiny_params(
        recipes={"mix": {"optimizer": "sgd", "lr": 0.1, "batch_size": 256, "epochs": 100, "mixup": 0.2}},
        profiles={"smoke": {"batch_size": 15}}, ray={"max_failures": 0},
        tables={"tmix": {"recipe": "mix", "rows": ROWS}}))
    run_study(params, ["tmix"], tmp_path / "results")
    ((row,),) = [r["runs"] for r in json.loads((tmp_path / "results" / "tmix.json").read_text())["rows"]]
    assert row["status"] == "MISSING"
    assert row["reason"].startswith("ConfigError: batch_size: got 15; allowed: an even batch"), row["reason"]
    summary = capsys.readouterr().err.split("study summary:")[-1]
    assert "FAILED" in summary and "tmix row 1 (baseline) seed 0: ConfigError: batch_size" in summary, summary


# ---- Ray listens on loopback only

LOCAL_RAY = textwrap.dedent("""
    import json, psutil, ray  # imported first, as any caller may have done
    from pipeline.utils.cluster import connect

    print(connect(None, 1), flush=True)
    me = psutil.Process()
    tree = {me.pid, *(p.pid for p in me.children(recursive=True))}
    listening = [c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.pid in tree]
    print(json.dumps(listening))
""")


def test_a_local_ray_listens_on_loopback_only() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", LOCAL_RAY], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr
    where, listening = proc.stdout.strip().splitlines()[-2:]
    addresses = json.loads(listening)
    assert where == "local, 127.0.0.1"
    assert len(addresses) >= 2, "the GCS and the raylet at least"
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip in addresses), addresses


# ---- an interrupted sweep stage


def test_sigterm_ends_the_study_stage_and_its_runs_as_killed(tiny_params: Callable[..., Path], tmp_path: Path) -> None:
    """SIGTERM (what `kill`, a scheduler or DVC's own interruption sends) mid-trial: the stage exits non-zero,
    the sweep's run and the trial's run end KILLED with a reason, and the trial's checkpoint still loads."""
    from mlflow import MlflowClient

    from pipeline.training.record import CHECKPOINT, load_checkpoint

    path = tiny_params(profiles={"smoke": {"epochs": 200}}, tables={"tsigterm": {"recipe": "resnet", "rows": ROWS}})
    params = load_params(path)
    client = MlflowClient(params.mlflow.tracking_uri)
    proc = subprocess.Popen([sys.executable, "stages/study.py", "--params", str(path), "tsigterm"], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        trial_run = None
        while trial_run is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()]) \
                if Path(str(params.mlflow.tracking_uri).removeprefix("sqlite:///")).exists() else []
            trial_run = next((r for r in runs if "trial_id" in r.data.tags
                              and client.get_metric_history(r.info.run_id, "val_top1")), None)
        assert trial_run is not None, "no trial finished an epoch in time"
        proc.send_signal(15)
        output = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
        (REPO_ROOT / "results" / "tsigterm.json").unlink(missing_ok=True)
        (REPO_ROOT / "results" / "tsigterm.csv").unlink(missing_ok=True)
    assert proc.returncode == 128 + 15 and "error: interrupted by SIGTERM" in output, output
    ended = client.get_run(trial_run.info.run_id)
    assert ended.info.status == "KILLED", output
    assert ended.data.tags["failure_reason"].startswith("interrupted"), ended.data.tags
    parent = client.get_run(ended.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"
    state = load_checkpoint(Path(params.train.checkpoint_root) / trial_run.data.tags["trial_id"] / CHECKPOINT,
                            trial_run.data.tags["trial_id"])
    assert state is not None and state["epoch"] >= 1
