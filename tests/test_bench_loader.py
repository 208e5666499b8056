"""bench-loader and the scale rehearsal: small real runs (generated images, real prepare, DVC and git)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.__main__ import main
from pipeline.bench.imagenet_like import size_summary, write_imagenet_like

pytestmark = pytest.mark.slow

HAS_DVC = Path(sys.executable).with_name("dvc").is_file() or shutil.which("dvc") is not None
needs_dvc = pytest.mark.skipif(shutil.which("git") is None or not HAS_DVC, reason="rehearse needs git and dvc")


def test_imagenet_like_tree_is_deterministic_and_photo_sized(tmp_path: Path) -> None:
    one = write_imagenet_like(tmp_path / "a", 30, classes=3, workers=2)
    two = write_imagenet_like(tmp_path / "b", 30, classes=3, workers=1)
    assert [p.relative_to(tmp_path / "a") for p in one] == [p.relative_to(tmp_path / "b") for p in two]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))
    assert {p.parts[-3] for p in one} == {"train", "val"}
    assert {p.parent.name for p in one} == {"n00000000", "n00000001", "n00000002"}
    summary = size_summary(one)
    assert summary["count"] == 30 and 300 < summary["mean_long"] < 800
    for path in one:
        with Image.open(path) as img:
            assert img.format == "JPEG" and 200 <= max(img.size) <= 1600
            if img.size in ((500, 375), (375, 500)):
                assert 40_000 < path.stat().st_size < 200_000


def test_bench_loader_prints_the_three_methods(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench-loader", "--images", "40", "--img-size", "64", "--batch", "8", "--repeats", "1",
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "source: 40 JPEGs" in out and "prepared train split: 32 images" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["workers"])
    assert "project img/s" in lines[header] and "plain img/s" in lines[header] and "project/plain" in lines[header]
    row = lines[header + 1].split()
    assert row[0] == "1" and float(row[1]) > 0 and float(row[3]) > 0 and row[5].endswith("x")
    assert "decode loop (1 process, stored JPEGs, no crop):" in out and "project (1 worker) / decode:" in out


@needs_dvc
def test_rehearse_passes_its_checks_with_the_project_dvc_config(capsys: pytest.CaptureFixture[str]) -> None:
    """With the project's own cache.type (.dvc/config), `dvc add` leaves the shards as links into the cache,
    not a second copy beside it."""
    code = main(["rehearse", "--images", "120", "--workers", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    out = captured.out
    for step in ("generate:", "prepare:", "check: 6 files (2 shards), 120 manifest rows", "dvc: add",
                 "read: one epoch of the train split, 96 images = the split's size", "all checks passed"):
        assert f"rehearse: {step}" in out, out
    assert "shards linked into the cache" in out or "reflinked" in out


@needs_dvc
def test_rehearse_fails_on_too_many_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    assert main(["rehearse", "--images", "20", "--max-files", "3", "--out", str(work)]) == 1
    err = capsys.readouterr().err
    assert "rehearse: FAILED: the prepared folder holds 6 files, more than --max-files 3" in err
    assert not work.exists()  # deleted without --keep


@needs_dvc
def test_rehearse_catches_a_cache_that_copies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rehearse", "--images", "20", "--cache-type", "copy"]) == 1
    err = capsys.readouterr().err
    assert "rehearse: FAILED: train-00000.tar is a separate copy of its cache file" in err
    assert "the DVC cache doubles the data" in err
