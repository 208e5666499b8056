"""Loaders over a prepared dataset folder (see prepared.py).

`build_loader` yields `(images, labels)`: images float (B, 3, img_size, img_size) standardised with the
dataset's own stats.json mean/std, labels long (index into classes.json). Reid datasets (stats `task`
"reid") yield `(images, labels, pids, camids)`: `labels` is the training identity index (-1 for query
and gallery ids not in classes.json), `pids` the Market-1501 person id (-1 junk, 0 distractor) and
`camids` the camera, as long tensors, which is what the reid evaluation needs.

Determinism: a `SeededSampler` draws the order and one seed per sample from a generator seeded with
`seed`; each sample's augmentation runs under that seed, so a run is repeatable whatever `workers` is.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from ..config import AugmentConfig, ConfigError
from .prepared import read_dataset

CROP_PCT = 224 / 256  # the paper's resize 256 → crop 224


def _interp(name: str) -> T.InterpolationMode:
    return T.InterpolationMode.BICUBIC if name == "bicubic" else T.InterpolationMode.BILINEAR


def build_transform(img_size: int, train: bool, mean: list[float], std: list[float],
                    augment: AugmentConfig | None = None, reid: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """The standard pipeline of the authors' code, or timm's stack when `augment.kind == "timm"` (training).

    Classification: RandomResizedCrop(img_size, crop_scale) + flip (train); resize to img_size/0.875 and
    centre crop (eval), as the authors' main.py. Reid (person crops are tall): resize to a square, flip and
    pad+random crop (train).
    """
    aug = augment or AugmentConfig()
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if train and aug.kind == "timm":
        return create_transform(img_size, is_training=True, hflip=aug.hflip, auto_augment=aug.auto_augment,
                                scale=aug.crop_scale, color_jitter=aug.color_jitter or None, re_prob=aug.reprob,
                                re_mode=aug.remode,
                                interpolation=aug.interpolation, mean=tuple(mean), std=tuple(std))
    interp = _interp(aug.interpolation)
    if reid:
        steps = [T.Resize((img_size, img_size), interp)]
        if train:
            steps += [T.RandomHorizontalFlip(aug.hflip), T.Pad(max(1, img_size // 16)), T.RandomCrop(img_size)]
        return T.Compose(steps + norm)
    if train:
        steps = [T.RandomResizedCrop(img_size, scale=aug.crop_scale, interpolation=interp),
                 T.RandomHorizontalFlip(aug.hflip)]
    else:
        steps = [T.Resize(int(round(img_size / CROP_PCT)), interp), T.CenterCrop(img_size)]
    return T.Compose(steps + norm)


class PreparedDataset(Dataset):
    """One split of a prepared folder; `classes` and `stats` are the folder's classes.json and stats.json.
    Items are addressed by `(index, seed)` from `SeededSampler` (or a plain index, then unseeded)."""

    def __init__(self, data_dir: str | Path, split: str,
                 transform: Callable[[Image.Image], torch.Tensor] = T.ToTensor()):
        rows, self.classes, self.stats = read_dataset(data_dir)
        splits = self.stats.get("splits", sorted({r["split"] for r in rows}))
        if split not in splits:
            raise ConfigError("split", split, "one of " + ", ".join(map(repr, splits)))
        self.root = Path(data_dir)
        self.rows = [r for r in rows if r["split"] == split]
        self.reid = self.stats.get("task") == "reid"
        self.transform = transform
        self.labels = [int(r["label"]) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, ...]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        row = self.rows[index]
        with Image.open(self.root / row["path"]) as img:
            img = img.convert("RGB")
        if seed is None:
            x = self.transform(img)
        else:
            with torch.random.fork_rng(devices=[]):
                py_state, np_state = random.getstate(), np.random.get_state()
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                try:
                    x = self.transform(img)
                finally:
                    random.setstate(py_state)
                    np.random.set_state(np_state)
        if self.reid:
            return x, self.labels[index], int(row["pid"]), int(row["camid"])
        return x, self.labels[index]


class SeededSampler(Sampler):
    """Yields `(index, sample_seed)`: a (shuffled) order and one augmentation seed per sample per epoch,
    both drawn from `generator`, so epochs differ but a run with the same seed repeats exactly."""

    def __init__(self, n: int, shuffle: bool, generator: torch.Generator):
        self.n, self.shuffle, self.generator = n, shuffle, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=self.generator)
        return iter(zip(order.tolist(), seeds.tolist()))


def build_loader(data_dir: str | Path, split: str, img_size: int, batch_size: int, train: bool,
                 augment: AugmentConfig | None = None, workers: int = 0, seed: int = 0,
                 shuffle: bool | None = None) -> DataLoader:
    """A DataLoader over one split of a prepared dataset (see the module docstring for what it yields).

    `train` picks the augmentation (and drops a last partial batch, which BatchNorm cannot take when it
    holds one image); `shuffle` defaults to `train`.
    """
    if img_size < 8:
        raise ConfigError("img_size", img_size, "an integer >= 8")
    if batch_size < 1:
        raise ConfigError("batch_size", batch_size, "an integer >= 1")
    dataset = PreparedDataset(data_dir, split)
    dataset.transform = build_transform(img_size, train, dataset.stats["mean"], dataset.stats["std"], augment,
                                        dataset.reid)
    generator = torch.Generator().manual_seed(seed)
    sampler = SeededSampler(len(dataset), train if shuffle is None else shuffle, generator)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      drop_last=train and len(dataset) > batch_size, persistent_workers=workers > 0,
                      generator=generator)
