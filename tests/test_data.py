"""Data stage: sources, bad files, layout errors, determinism and loaders, on small real trees."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

from pipeline.config import AugmentConfig, BuiltinDataConfig, ConfigError, PrepareConfig
from pipeline.data.builtin import draw_shape
from pipeline.data.loaders import build_loader
from pipeline.data.prepare import prepare
from pipeline.data.shards import ShardReader
from pipeline.data.sources import scan_market1501

SMALL = BuiltinDataConfig(num_classes=3, train_per_class=6, val_per_class=3, image_size=32,
                          train_ids=4, test_ids=4, cameras=3, images_per_id=3, distractors=2, junk=2)


def _jpeg(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    draw_shape("disc", 48, np.random.default_rng(seed)).resize(size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tree_hash(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    """A small ImageNet-layout tree with one of each kind of bad input."""
    root = tmp_path / "src"
    for split, n in (("train", 4), ("val", 2)):
        for c, cls in enumerate(("cat", "dog")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}.jpg").write_bytes(_jpeg(100 * c + 10 * i + len(split)))
    good = _jpeg(7)
    bad = {
        "train/cat/zero.jpg": b"",
        "train/cat/text.jpg": b"this is a text file, not a JPEG\n",
        "train/dog/truncated.jpg": good[: len(good) // 2],
        "train/dog/corrupt.jpg": good[:2] + bytes(range(256)) * 4,
        "train/dog/notes.txt": b"labels are folder names\n",
        "val/cat/README": b"hello\n",
        "train/stray.jpg": good,
    }
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    (root / "train" / "bird").mkdir()  # empty class folder
    (root / "val" / "dog" / "nested").mkdir()
    (root / "val" / "dog" / "nested" / "deep.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    return root


def test_imagefolder_rejects_each_bad_file_and_keeps_the_rest(imagefolder: Path, tmp_path: Path):
    out = tmp_path / "out"
    stats = prepare(PrepareConfig(source="imagefolder", root=str(imagefolder), out=str(out), resize=24), workers=2)
    rejected = {r["path"]: r["reason"] for r in stats["rejected"]}
    assert rejected.keys() == {"train/cat/zero.jpg", "train/cat/text.jpg", "train/dog/truncated.jpg",
                               "train/dog/corrupt.jpg", "train/dog/notes.txt", "val/cat/README",
                               "train/stray.jpg", "train/bird", "val/dog/nested/deep.png"}
    assert rejected["train/cat/zero.jpg"] == "empty file (0 bytes)"
    assert "truncated" in rejected["train/dog/truncated.jpg"]
    assert rejected["train/cat/text.jpg"].startswith("not an image")
    assert rejected["train/bird"] == "empty class folder"
    assert rejected["train/stray.jpg"] == "not inside a class folder"
    assert "extension" in rejected["train/dog/notes.txt"]
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog"]
    assert stats["counts"]["train"]["per_class"] == {"cat": 4, "dog": 4}
    assert stats["counts"]["val"]["images"] == 4
    rows = (out / "manifest.csv").read_text().splitlines()
    assert rows[0].startswith("path,label,split,class,sha256,orig_width,orig_height,width,height")
    assert len(rows) == 1 + 12
    reader = ShardReader(out)
    for row in csv.DictReader(rows):
        assert int(row["label"]) == ["cat", "dog"].index(row["class"]) and row["path"].split("/")[1] == row["class"]
        with Image.open(io.BytesIO(reader.read(row["shard"], int(row["offset"]), int(row["size"])))) as img:
            assert min(img.size) == 24 and img.size == (29, 24)  # 48x40 → short side 24
    assert len(stats["mean"]) == len(stats["std"]) == 3 and all(0 < s < 1 for s in stats["std"])


def test_outputs_are_byte_identical_across_runs_and_worker_counts(imagefolder: Path, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    prepare(PrepareConfig(source="imagefolder", root=str(imagefolder), out=str(a), resize=24), workers=1)
    prepare(PrepareConfig(source="imagefolder", root=str(imagefolder), out=str(b), resize=24), workers=2)
    assert _tree_hash(a) == _tree_hash(b) and len(_tree_hash(a)) == 6  # 2 shards, manifest, classes, stats, marker
    prepare(PrepareConfig(source="imagefolder", root=str(imagefolder), out=str(b), resize=24), workers=2)
    assert _tree_hash(a) == _tree_hash(b)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_builtin_is_deterministic_from_its_seed(tmp_path: Path):
    runs = [prepare(PrepareConfig(source="builtin", out=str(tmp_path / n), resize=24, builtin=SMALL), workers=w)
            for n, w in (("a", 1), ("b", 2))]
    assert _tree_hash(tmp_path / "a") == _tree_hash(tmp_path / "b")
    assert runs[0]["counts"]["train"]["images"] == 18 and runs[0]["counts"]["val"]["images"] == 9
    other = BuiltinDataConfig(**{**SMALL.__dict__, "seed": 1})
    prepare(PrepareConfig(source="builtin", out=str(tmp_path / "c"), resize=24, builtin=other), workers=1)
    assert _tree_hash(tmp_path / "a")["manifest.csv"] != _tree_hash(tmp_path / "c")["manifest.csv"]


def _market(root: Path) -> None:
    names = {
        "bounding_box_train": ["0002_c1s1_000451_00.jpg", "0002_c2s1_000551_01.jpg", "0007_c3s2_000100_00.jpg",
                               "-1_c1s1_000001_00.jpg", "0000_c2s1_000002_00.jpg", "bad_name.jpg"],
        "query": ["0011_c1s1_000300_00.jpg", "0013_c2s1_000301_00.jpg"],
        "bounding_box_test": ["0011_c2s1_000400_00.jpg", "0013_c1s1_000401_00.jpg", "-1_c1s1_000500_00.jpg",
                              "0000_c3s1_000600_00.jpg", "Thumbs.db"],
    }
    for folder, files in names.items():
        (root / folder).mkdir(parents=True)
        for i, name in enumerate(files):
            (root / folder / name).write_bytes(_jpeg(i, (32, 64)))


def test_market1501_ids_cameras_junk_and_distractors(tmp_path: Path):
    _market(tmp_path / "m")
    scan = scan_market1501(tmp_path / "m")
    by_src = {it.src: it for it in scan.items}
    assert (by_src["bounding_box_train/0002_c2s1_000551_01.jpg"].pid,
            by_src["bounding_box_train/0002_c2s1_000551_01.jpg"].camid) == (2, 2)
    assert by_src["bounding_box_test/-1_c1s1_000500_00.jpg"].pid == -1
    assert by_src["bounding_box_test/0000_c3s1_000600_00.jpg"].pid == 0
    stats = prepare(PrepareConfig(source="market1501", root=str(tmp_path / "m"), out=str(tmp_path / "o"),
                                  resize=16), workers=1)
    reasons = {r["path"]: r["reason"] for r in stats["rejected"]}
    assert reasons["bounding_box_train/-1_c1s1_000001_00.jpg"] == "junk id -1 in the training split"
    assert reasons["bounding_box_train/0000_c2s1_000002_00.jpg"] == "distractor id 0 in the training split"
    assert "does not match" in reasons["bounding_box_train/bad_name.jpg"]
    assert "extension" in reasons["bounding_box_test/Thumbs.db"]
    assert json.loads((tmp_path / "o" / "classes.json").read_text()) == ["0002", "0007"]
    assert stats["counts"]["gallery"]["junk"] == 1 and stats["counts"]["gallery"]["distractors"] == 1
    assert stats["counts"]["train"]["images"] == 3 and stats["counts"]["query"]["ids"] == 2
    gallery = build_loader(tmp_path / "o", "gallery", 16, 8, train=False)
    x, labels, pids, camids = next(iter(gallery))
    assert x.shape == (4, 3, 16, 16)
    assert pids.tolist() == [-1, 0, 11, 13] and camids.tolist() == [1, 3, 2, 1]
    assert labels.tolist() == [-1, -1, -1, -1]
    x, labels, pids, _ = next(iter(build_loader(tmp_path / "o", "train", 16, 8, train=False)))
    assert labels.tolist() == [0, 0, 1] and pids.tolist() == [2, 2, 7]


def test_builtin_reid_has_multi_camera_ids_junk_and_distractors(tmp_path: Path):
    stats = prepare(PrepareConfig(source="builtin_reid", out=str(tmp_path / "r"), resize=16, builtin=SMALL),
                    workers=1)
    assert stats["rejected"] == [] and stats["num_classes"] == 4
    gallery = stats["counts"]["gallery"]
    assert gallery["junk"] == 2 and gallery["distractors"] == 2 and gallery["ids"] == 4
    rows = [line.split(",") for line in (tmp_path / "r" / "manifest.csv").read_text().splitlines()[1:]]
    cams: dict[str, set[str]] = {}
    for row in rows:
        cams.setdefault(row[-2], set()).add(row[-1])
    assert all(len(c) >= 2 for pid, c in cams.items() if int(pid) > 0)


@pytest.mark.parametrize("make,expected,found", [
    (lambda r: None, "ImageFolder tree", "missing folder"),
    (lambda r: (r / "train" / "cat").mkdir(parents=True), "ImageFolder tree", "train/"),
    (lambda r: ((r / "train").mkdir(parents=True), (r / "val").mkdir()), "class folders in train/", "none"),
])
def test_wrong_layout_is_one_clear_error(tmp_path: Path, make, expected, found):
    root = tmp_path / "src"
    make(root)
    with pytest.raises(ConfigError) as err:
        prepare(PrepareConfig(source="imagefolder", root=str(root), out=str(tmp_path / "o")), workers=1)
    assert expected in str(err.value) and found in str(err.value)
    assert not (tmp_path / "o").exists()


def test_market_layout_error_names_the_folders(tmp_path: Path):
    (tmp_path / "m" / "query").mkdir(parents=True)
    with pytest.raises(ConfigError, match="bounding_box_train.*found entries query/"):
        prepare(PrepareConfig(source="market1501", root=str(tmp_path / "m"), out=str(tmp_path / "o")), workers=1)


def test_nothing_usable_fails(tmp_path: Path):
    for split in ("train", "val"):
        (tmp_path / "src" / split / "a").mkdir(parents=True)
        (tmp_path / "src" / split / "a" / "x.jpg").write_bytes(b"")
    with pytest.raises(ConfigError, match="none usable"):
        prepare(PrepareConfig(source="imagefolder", root=str(tmp_path / "src"), out=str(tmp_path / "o")), workers=1)
    assert not (tmp_path / "o").exists()


def test_root_required_for_folder_sources():
    with pytest.raises(ConfigError, match="root"):
        PrepareConfig(source="imagefolder")


def test_loaders_shapes_labels_standardisation_and_determinism(tmp_path: Path):
    out = tmp_path / "b"
    prepare(PrepareConfig(source="builtin", out=str(out), resize=40, builtin=SMALL), workers=1)
    val = build_loader(out, "val", 32, 4, train=False)
    batches = list(val)
    assert [len(b[1]) for b in batches] == [4, 4, 1]  # eval keeps every image, in manifest order
    x, y = batches[0]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    labels = torch.cat([b[1] for b in batches]).tolist()
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    pixels = torch.cat([b[0] for b in batches])
    assert abs(pixels.mean().item()) < 0.3 and 0.7 < pixels.std().item() < 1.3  # standardised

    timm_aug = AugmentConfig(kind="timm", auto_augment="rand-m9-mstd0.5-inc1", reprob=0.5)
    for augment in (None, timm_aug):
        runs = [[b for b in build_loader(out, "train", 32, 4, train=True, augment=augment, seed=s, workers=w)]
                for s, w in ((3, 0), (3, 2), (4, 0))]
        assert [len(b[1]) for b in runs[0]] == [4, 4, 4, 4]  # drop_last: 18 images → 4 full batches
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(runs[0], runs[1]))
        assert not torch.equal(runs[0][0][0], runs[2][0][0])
        loader = build_loader(out, "train", 32, 4, train=True, augment=augment, seed=3)
        first, second = [torch.cat([b[0] for b in loader]) for _ in range(2)]
        assert not torch.equal(first, second)  # a new order and new crops each epoch


def test_rand_augment_at_its_top_magnitude_runs_every_op():
    """The recipes' RandAugment (`-inc1`, mstd 0.5) reaches magnitude 10, where timm asks PIL to posterize to
    0 bits; Pillow 13 rejects that (constraints.txt pins the last Pillow that posterizes to black), which
    failed Table 8's trials at random. Every op at magnitude 10, on a built-in image: none may raise."""
    image = draw_shape("triangle", 64, np.random.default_rng(0), clutter=0.5)
    ops = rand_augment_transform("rand-m10-mstd0-inc1", {"img_mean": (124, 116, 104)}).ops
    assert len(ops) == 15 and any(op.name == "PosterizeIncreasing" for op in ops)
    for op in ops:
        op.prob = 1.0
        assert op(image).size == image.size, op.name


@pytest.mark.slow
def test_cli_reports_a_layout_error_with_exit_code_2(tmp_path: Path):
    run = subprocess.run([sys.executable, "-m", "pipeline", "prepare", "--source", "imagefolder",
                          "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert run.returncode == 2 and "error: root" in run.stderr and "ImageFolder tree" in run.stderr


@pytest.mark.slow
def test_dvc_stage_entry_builds_the_profile_datasets(tmp_path: Path):
    small = {k: getattr(SMALL, k) for k in SMALL.__dataclass_fields__}
    repo = Path(__file__).parents[1]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["datasets"]["builtin"] = {"source": "builtin", "out": str(tmp_path / "shapes"), "resize": 24,
                                     "builtin": small}
    params["datasets"]["builtin_reid"] = {"source": "builtin_reid", "out": str(tmp_path / "persons"), "resize": 16,
                                          "builtin": dict(small)}  # a copy: params.yaml refuses YAML aliases
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    stage = [sys.executable, str(repo / "stages" / "prepare.py"), "--params", str(tmp_path / "params.yaml")]
    run = subprocess.run(stage,
                         cwd=repo, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "shapes/stats.json").read_text())["task"] == "classification"
    assert json.loads((tmp_path / "persons/stats.json").read_text())["task"] == "reid"
