"""Data is checked before it is trained on: shards cut short are one line before training."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.data.prepared import check_shards

REPO = Path(__file__).parents[1]


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
def test_training_on_a_cut_shard_is_one_line_before_anything_is_written(tiny_data: Path,
                                                                        tiny_params: Callable[..., Path],
                                                                        tmp_path: Path):
    data = _copy(tiny_data, tmp_path / "data")
    os.truncate(data / "shards" / "train-00000.tar", 40000)
    proc = subprocess.run(_train_cmd(data, tiny_params(), tmp_path / "ckpt"), cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    _one_clean_line(proc, "error: data_dir:", "shards/train-00000.tar is 40000 bytes")
    assert not (tmp_path / "ckpt").exists()
