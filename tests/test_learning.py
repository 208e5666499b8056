"""The pipeline learns: the real `train` command on prepared shards reaches accuracy well above chance on
held-apart images within a bounded number of updates, and the same command on the same images with their
training labels shuffled does not. A label/image mismatch, a crop that removes the object or a broken
evaluation path fails the first; a check too weak to tell learning from noise fails the second."""
from __future__ import annotations

import csv
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline import REPO_ROOT
from pipeline.config import BuiltinDataConfig, PrepareConfig
from pipeline.data import build_loader
from pipeline.data.prepare import prepare
from pipeline.data.prepared import MANIFEST, read_meta
from pipeline.models import build_reid_model
from pipeline.training.tasks import evaluate_reid, task_of

CLASSIFY = {"num_classes": 4, "train_per_class": 100, "val_per_class": 32}
"""400 training images: 6 epochs at batch 16 are 150 updates; 128 validation images."""
REID = {"train_ids": 24, "test_ids": 24, "images_per_id": 8, "distractors": 10, "junk": 10}
"""192 training crops of 24 identities; 24 other identities' queries against their gallery."""


def _prepare(root: Path, source: str, builtin: dict[str, Any], resize: int) -> Path:
    out = root / source
    prepare(PrepareConfig(source=source, out=str(out), resize=resize, builtin=BuiltinDataConfig(**builtin)),
            workers=1)
    return out


def shuffled_labels(data_dir: Path, out: Path, split: str) -> Path:
    """A copy of a prepared folder whose `split` rows keep their images but take the label (and class, and
    for re-identification the person id) of another row of that split: the same label counts, no relation
    between an image and its label."""
    shutil.copytree(data_dir, out)
    path = out / MANIFEST
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields, rows = list(reader.fieldnames or []), list(reader)
    keys = [k for k in ("label", "class", "pid") if k in fields]
    picked = [i for i, row in enumerate(rows) if row["split"] == split]
    labels = [tuple(rows[i][k] for k in keys) for i in picked]
    random.Random(0).shuffle(labels)
    for i, values in zip(picked, labels):
        rows[i].update(zip(keys, values))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return out


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("learn")
    data = _prepare(root, "builtin", CLASSIFY, 80)
    return {"true": data, "shuffled": shuffled_labels(data, root / "shuffled", "train")}


@pytest.fixture(scope="module")
def persons(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("learn_reid")
    data = _prepare(root, "builtin_reid", REID, 64)
    return {"true": data, "shuffled": shuffled_labels(data, root / "shuffled", "train")}


def train(data: Path, tmp_path: Path, *args: str) -> dict[str, Any]:
    """`python -m pipeline train` in a temporary store; its printed result."""
    cmd = [sys.executable, "-m", "pipeline", "train", "--data", str(data), "--head", "kind=baseline",
           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--checkpoint-dir", str(tmp_path / "ck"),
           "--loader-workers", "0", *args]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{\n"):])


@pytest.mark.slow
@pytest.mark.parametrize("labels", ["true", "shuffled"])
def test_a_classifier_learns_the_shapes_and_not_shuffled_labels(shapes: dict[str, Path], labels: str,
                                                                tmp_path: Path) -> None:
    """ResNet18 at 64 px, 150 updates: top-1 at least twice chance (50 % on 4 classes; on 128 images chance's
    one-sided 95 % bound is 31 %) with the true labels, under it with shuffled ones (measured: 57 and 58 % at
    seeds 0 and 1; 22 and 27 % shuffled)."""
    result = train(shapes[labels], tmp_path, "--backbone", "resnet18", "--recipe", "resnet", "--img-size", "64",
                   "--epochs", "6", "--batch-size", "16")
    chance = task_of(read_meta(shapes[labels])[1]).chance(shapes[labels])["top1"]
    learned = result["top1"] >= 2 * chance
    print(f"{labels} labels: top-1 {result['top1']:.1f} % (chance {chance:.1f} %)")  # shown by pytest -rP
    assert learned == (labels == "true"), f"{labels} labels: top-1 {result['top1']:.1f} % (chance {chance:.1f} %)"


@pytest.mark.slow
@pytest.mark.parametrize("labels", ["true", "shuffled"])
def test_a_reid_model_learns_the_identities_and_not_shuffled_ones(persons: dict[str, Path], labels: str,
                                                                  tmp_path: Path) -> None:
    """ResNet18 trained from scratch on 24 identities ranks the other 24's galleries: mAP at least 1.5 times
    that of the same network untrained with the true identities, under it with shuffled ones. The reference is
    the untrained network, not a random ranking: random features already match clothes by colour (measured:
    random ranking 3.8 %, untrained 23.5 %, trained 53.0 %, trained on shuffled identities 17.7 %)."""
    result = train(persons[labels], tmp_path, "--backbone", "resnet18", "--recipe", "reid_scratch",
                   "--img-size", "64", "--epochs", "6", "--batch-size", "16")
    torch.manual_seed(0)
    untrained = build_reid_model("resnet18", {"kind": "baseline"}, REID["train_ids"], 64).eval()
    loaders = (build_loader(persons[labels], split, 64, 64, train=False) for split in ("query", "gallery"))
    reference = evaluate_reid(untrained, *loaders)["map"]
    learned = result["map"] >= 1.5 * reference
    print(f"{labels} identities: mAP {result['map']:.1f} % (untrained {reference:.1f} %)")  # shown by pytest -rP
    assert learned == (labels == "true"), \
        f"{labels} identities: mAP {result['map']:.1f} % (untrained {reference:.1f} %)"
