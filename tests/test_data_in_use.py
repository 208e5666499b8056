"""Data is checked before it is trained on: shards cut short are one line before training, two prepares into
one folder do not both run, and a dataset a training reads is not replaced under it (pipeline/data/lock.py)."""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipeline.config import ConfigError
from pipeline.data.prepared import check_shards, manifest_hash

REPO = Path(__file__).parents[1]


def _pipeline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def _train_cmd(data: Path, params: Path, folder: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", "--backbone", "resnet18", "--head", "kind=baseline",
            "--data", str(data), "--img-size", "32", "--epochs", "1", "--batch-size", "16", "--params", str(params),
            "--checkpoint-dir", str(folder), "--experiment", "data_in_use"]


def _one_clean_line(proc: subprocess.CompletedProcess[str], *said: str) -> None:
    """Exit 2 with a short error that says `said`, not a traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) <= 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert all(text in proc.stderr for text in said), proc.stderr


def _copy(data: Path, to: Path) -> Path:
    shutil.copytree(data, to)
    return to


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 16), (200, 100, 40)).save(buf, "JPEG")
    return buf.getvalue()


@contextmanager
def _prepare_held_open(src: Path, out: Path) -> Iterator[None]:
    """A real `prepare` into `out`, stopped mid-conversion for as long as the block runs: one of its inputs is
    a FIFO, which it reads (and blocks on) while holding its locks; the image is written to it afterwards."""
    for split in ("train", "val"):
        (src / split / "a").mkdir(parents=True)
        (src / split / "a" / "0.jpg").write_bytes(_jpeg())
    fifo = src / "train" / "a" / "1.jpg"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "prepare", "--workers", "1", "--source", "imagefolder",
                             "--root", str(src), "--out", str(out)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:  # opening a FIFO to write succeeds once its reader has opened it: prepare is mid-conversion
        try:
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "prepare never read its inputs"
            time.sleep(0.05)
    try:
        yield
    finally:
        os.write(writer, _jpeg())
        os.close(writer)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()


def test_check_shards_refuses_a_short_or_missing_shard_and_passes_a_whole_one(tiny_data: Path, tmp_path: Path):
    data = _copy(tiny_data, tmp_path / "data")
    check_shards(data)
    shard = data / "shards" / "train-00000.tar"
    os.truncate(shard, 40000)
    with pytest.raises(ConfigError, match="shards/train-00000.tar is 40000 bytes, its manifest needs at least"):
        check_shards(data)
    shard.unlink()
    with pytest.raises(ConfigError, match="shards/train-00000.tar is missing"):
        check_shards(data)


@pytest.mark.slow
def test_a_second_prepare_into_the_same_folder_is_refused(tmp_path: Path):
    out = tmp_path / "out"
    with _prepare_held_open(tmp_path / "src", out):
        second = _pipeline("prepare", "--workers", "1", "--source", "builtin", "--out", str(out))
        _one_clean_line(second, "error: out:", "another prepare is building it now")
    assert (out / "manifest.csv").read_text().count("\n") == 1 + 3  # the first one's 3 images, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # its lock and work folders are gone


@pytest.mark.slow
def test_training_on_a_cut_shard_is_one_line_before_anything_is_written(tiny_data: Path,
                                                                        tiny_params: Callable[..., Path],
                                                                        tmp_path: Path):
    data = _copy(tiny_data, tmp_path / "data")
    os.truncate(data / "shards" / "train-00000.tar", 40000)
    proc = subprocess.run(_train_cmd(data, tiny_params(), tmp_path / "ckpt"), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    _one_clean_line(proc, "error: data_dir:", "shards/train-00000.tar is 40000 bytes")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.slow
def test_a_training_is_refused_while_prepare_replaces_its_data(tiny_data: Path, tiny_params: Callable[..., Path],
                                                               tmp_path: Path):
    data = _copy(tiny_data, tmp_path / "data")
    with _prepare_held_open(tmp_path / "src", data):
        proc = subprocess.run(_train_cmd(data, tiny_params(), tmp_path / "ckpt"), cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        _one_clean_line(proc, "error: data_dir:", "no prepare is replacing; one is replacing it now")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.slow
def test_a_dataset_in_use_is_not_replaced_and_the_trial_records_what_it_read(tiny_data: Path,
                                                                             tiny_params: Callable[..., Path],
                                                                             tmp_path: Path):
    """The training is paused (SIGSTOP) once it holds its data, so prepare certainly runs while it trains."""
    data = _copy(tiny_data, tmp_path / "data")
    read = manifest_hash(data)
    folder = tmp_path / "ckpt"
    log = tmp_path / "train.log"
    with open(log, "w") as err:
        train = subprocess.Popen(_train_cmd(data, tiny_params(), folder), cwd=REPO, stdout=subprocess.DEVNULL,
                                 stderr=err)
    deadline = time.monotonic() + 300
    while not (folder / "lock").exists():  # the trial's lock, taken once the data is held
        assert train.poll() is None and time.monotonic() < deadline, "the training never started"
        time.sleep(0.05)
    train.send_signal(signal.SIGSTOP)
    try:
        swap = _pipeline("prepare", "--workers", "1", "--source", "builtin", "--seed", "1", "--out", str(data))
    finally:
        train.send_signal(signal.SIGCONT)
    _one_clean_line(swap, "error: out:", "a training is reading it now, so nothing was touched")
    assert train.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert manifest_hash(data) == read
    assert yaml.safe_load((folder / "config.yaml").read_text())["data"]["manifest_hash"] == read
    again = _pipeline("prepare", "--workers", "1", "--source", "builtin", "--seed", "1", "--out", str(data))
    assert again.returncode == 0, again.stderr[-3000:]  # the training has ended: its lock went with it
    assert manifest_hash(data) != read
