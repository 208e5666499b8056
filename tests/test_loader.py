"""Data at scale: shards with an offset index, a prepare that resumes after a kill, and a loader whose
batches do not depend on its worker count or on where JPEGs are decoded."""
from __future__ import annotations

import csv
import hashlib
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from pipeline.config import AugmentConfig, MlflowConfig, PrepareConfig, TrainConfig, load_params
from pipeline.data.builtin import SHAPES, draw_shape
from pipeline.data.loaders import build_loader, decode
from pipeline.data.prepare import prepare
from pipeline.data.prepared import read_split
from pipeline.data.shards import ShardReader
from pipeline.training.run import run_trial
from pipeline.training.trial import resolve_trial

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[1]


def _photos(root: Path, n: int, size: tuple[int, int] = (240, 180)) -> Path:
    """An ImageFolder tree of `n` noisy JPEGs over 3 classes (every 4th in val)."""
    for i in range(n):
        rng = np.random.default_rng(i)
        img = np.asarray(draw_shape(SHAPES[i % 3], max(size), rng).crop((0, 0, *size)), dtype=np.int16)
        noisy = np.clip(img + rng.integers(-40, 40, img.shape), 0, 255).astype(np.uint8)
        path = root / ("val" if i % 4 == 0 else "train") / SHAPES[i % 3] / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(path, quality=90)
    return root


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _photos(tmp_path_factory.mktemp("photos") / "src", 160)


def test_shards_are_plain_tar_and_the_manifest_points_at_every_image(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    stats = prepare(PrepareConfig(source="imagefolder", root=str(photos), out=str(out), max_side=200, shard_mb=1),
                    workers=2)
    shards = sorted(p.relative_to(out).as_posix() for p in out.glob("shards/*.tar"))
    assert shards == stats["shards"] and len(shards) >= 3  # several train shards of at most ~1 MB, one val
    assert all(p.stat().st_size <= 2**20 + 100_000 for p in out.glob("shards/*.tar"))
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 160 and {r["path"] for r in rows} == {p.relative_to(photos).as_posix()
                                                            for p in photos.rglob("*.jpg")}
    reader = ShardReader(out)
    for row in rows[::17]:
        data = reader.read(row["shard"], int(row["offset"]), int(row["size"]))
        with tarfile.open(out / row["shard"]) as tar:  # what `tar` and WebDataset read is the same image
            member = next(m for m in tar.getmembers() if m.offset_data == int(row["offset"]))
            assert tar.extractfile(member).read() == data and member.name.endswith(".jpg")
        x, _ = decode(data)
        assert (x.shape[2], x.shape[1]) == (int(row["width"]), int(row["height"])) == (200, 150)  # long side capped
        assert row["split"] in row["shard"] and row["path"].split("/")[1] == row["class"]
    assert len(read_split(out, "val")) == 40 and set(read_split(out, "train").label.tolist()) == {0, 1, 2}


def test_a_killed_prepare_resumes_after_its_last_finished_shard(photos: Path, tmp_path: Path) -> None:
    args = [sys.executable, "-m", "pipeline", "prepare", "--source", "imagefolder", "--root", str(photos),
            "--max-side", "200", "--shard-mb", "1", "--workers", "1"]
    whole = subprocess.run([*args, "--out", str(tmp_path / "whole")], capture_output=True, text=True, cwd=REPO)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    done = tmp_path / ".killed.partial" / "done"
    proc = subprocess.Popen([*args, "--out", str(out)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (done / "00001.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and len(list(done.glob("*.json"))) >= 2  # nothing half-built is in place
    again = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 0, again.stderr
    assert "resuming after" in again.stderr
    assert _files(out) == _files(tmp_path / "whole")  # byte-identical to the uninterrupted run
    assert not (tmp_path / ".killed.partial").exists()


@pytest.fixture(scope="module")
def stored(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stored") / "out"
    prepare(PrepareConfig(source="imagefolder", root=str(photos), out=str(out), max_side=200), workers=2)
    return out


def _epoch(loader, epoch: int) -> list[tuple[torch.Tensor, ...]]:
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("img_size", [32, 96])  # 32: crops decode at 1/2 or 1/4 scale (JPEG draft mode)
def test_batches_do_not_depend_on_worker_count_and_repeat_by_epoch(stored: Path, img_size: int) -> None:
    runs = {w: build_loader(stored, "train", img_size, 16, train=True, workers=w, seed=5) for w in (0, 1, 2)}
    first = {w: _epoch(ld, 0) + _epoch(ld, 1) for w, ld in runs.items()}
    for w in (1, 2):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first[0], first[w]))
    again = build_loader(stored, "train", img_size, 16, train=True, workers=2, seed=5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[0][len(first[0]) // 2:], _epoch(again, 1)))
    assert not torch.equal(first[0][0][0], first[0][len(first[0]) // 2][0])  # epoch 1 is not epoch 0
    x = torch.cat([b[0] for b in first[0]])
    assert x.shape[1:] == (3, img_size, img_size) and abs(x.mean().item()) < 0.3 and 0.6 < x.std().item() < 1.4


def test_device_decoding_applies_the_same_crops_as_worker_decoding(stored: Path) -> None:
    """On the CPU both decode with libjpeg-turbo, so at a size without DCT scaling they agree exactly."""
    for train in (True, False):
        cpu, dev = (build_loader(stored, "train" if train else "val", 96, 8, train=train, seed=2, device_decode=d)
                    for d in (False, True))
        for a, b in zip(_epoch(cpu, 3), _epoch(dev, 3)):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_timm_recipes_repeat_with_workers_and_erase_per_batch_seed(stored: Path) -> None:
    aug = AugmentConfig(kind="timm", auto_augment="rand-m9-mstd0.5-inc1", reprob=0.5)
    a, b = (_epoch(build_loader(stored, "train", 64, 8, train=True, augment=aug, workers=w, seed=1), 0)
            for w in (0, 2))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))


def test_loader_throughput_and_a_truncated_shard_is_a_clear_error(stored: Path, tmp_path: Path) -> None:
    loader = build_loader(stored, "val", 64, 8, train=False)
    list(loader)
    assert loader.throughput() > 0 and loader.throughput() == 0.0  # reset by reading it
    shard = next(stored.glob("shards/val-*.tar"))
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in stored.iterdir():
        if p.is_file():
            (copy / p.name).write_bytes(p.read_bytes())
    (copy / "shards").mkdir()
    (copy / "shards" / shard.name).write_bytes(shard.read_bytes()[:2048])
    with pytest.raises(OSError, match="truncated"):
        list(build_loader(copy, "val", 64, 8, train=False))


@pytest.mark.gpu
def test_gpu_decoding_matches_cpu_decoding_closely(stored: Path) -> None:
    device = torch.device("cuda")
    for train in (True, False):
        cpu, gpu = (build_loader(stored, "train" if train else "val", 96, 8, train=train, seed=2, device=dev,
                                 device_decode=d) for dev, d in ((torch.device("cpu"), False), (device, True)))
        for a, b in zip(_epoch(cpu, 0), _epoch(gpu, 0)):
            assert b[0].device.type == "cuda" and torch.equal(a[1], b[1].cpu())
            assert (a[0] - b[0].cpu()).abs().mean() < 0.05  # nvJPEG and libjpeg-turbo round differently


@pytest.mark.gpu
def test_a_trial_decodes_on_the_gpu(stored: Path, tmp_path: Path) -> None:
    trial = resolve_trial({"backbone": "resnet18", "data_dir": str(stored), "head": {"kind": "noah"},
                           "recipe": "resnet", "img_size": 64, "epochs": 1, "batch_size": 16},
                          load_params().recipes)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_trial(trial, train=TrainConfig(progress="off", decode="gpu", loader_workers=2),
                       tracking=MlflowConfig(tracking_uri=uri), checkpoint_dir=tmp_path / "ck")
    run = MlflowClient(uri).get_run(result["run_id"])
    assert run.data.tags["decode"] == "device" and "data_wait_fraction" in run.data.metrics
