"""Loaders over a prepared dataset folder (format: prepared.py, shards.py).

`build_loader` yields `(images, labels)`: images float (B, 3, img_size, img_size) on `device`, standardised
with the dataset's own stats.json mean/std (or the recipe's `augment.mean`/`std`), labels long (index into
classes.json). Reid datasets (stats `task` "reid") yield `(images, labels, pids, camids)`: `labels` is the
training identity index (-1 for query and gallery ids not in classes.json), `pids` the Market-1501 person
id (-1 junk, 0 distractor) and `camids` the camera, which is what the reid evaluation needs.

Speed: loader workers read an image with one `pread` from its shard, decode it (at 1/2, 1/4 or 1/8 scale
when the crop still has enough pixels: JPEG's DCT scaling) and crop, resize and flip uint8 tensors with
torchvision's vectorised kernels; they hand over uint8, and the training process standardises whole
batches on the device. With `device_decode` the workers only read bytes and draw the crop: the batch is
decoded where it trains (nvJPEG on a GPU) and cropped there by the same `Augment`, so CPU and GPU decoding
apply the same geometry.

Determinism: a `SeededSampler` draws the order and one seed per sample from its own generator, seeded
from (seed, epoch) by `set_epoch`; each sample's augmentation runs under its seed, and nothing here draws
from the global generators, so a run repeats exactly whatever `workers` is, and a resumed run goes on as
the uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import io
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.random_erasing import RandomErasing
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from ..config import AugmentConfig, ConfigError
from ..utils.seeds import mix_seed
from .prepared import read_meta, read_split
from .shards import ShardReader

DCT_SCALES = (8, 4, 2)  # what libjpeg can decode at for free
CPU = torch.device("cpu")


class Augment:
    """Per-image geometry: `draw` its random parameters from the stored size (in a loader worker, under the
    sample's seed; no pixels needed), `apply` them to a decoded uint8 (3, H, W) tensor on any device."""

    def __init__(self, size: int, interpolation: str):
        self.size, self.mode = size, "bicubic" if interpolation == "bicubic" else "bilinear"

    def draw(self, height: int, width: int) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.int64)

    def reduction(self, params: torch.Tensor, height: int, width: int) -> int:
        """The largest DCT scale-down (1, 2, 4, 8) after which `apply` still only shrinks the image."""
        return 1

    def apply(self, x: torch.Tensor, params: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
        """`x` is the stored image decoded at `factor` of its size."""
        raise NotImplementedError

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Antialiased resize as torchvision's (the same pixels): torch's uint8 kernel on the CPU, which
        torchvision's wrapper makes 2.5x slower, and float on a GPU, which has no uint8 kernel."""
        if x.device.type == "cpu":
            return nn.functional.interpolate(x[None], size=size, mode=self.mode, antialias=True)[0]
        y = nn.functional.interpolate(x[None].float(), size=size, mode=self.mode, antialias=True)[0]
        return y.round_().clamp_(0, 255).to(torch.uint8)


class RandomResizedCropFlip(Augment):
    """The authors' training crop: RandomResizedCrop(size, scale, ratio) + horizontal flip."""

    def __init__(self, size: int, interpolation: str, scale: tuple[float, ...], ratio: tuple[float, ...],
                 hflip: float):
        super().__init__(size, interpolation)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip

    def draw(self, height: int, width: int) -> torch.Tensor:
        shape = torch.empty(1, 1, 1).expand(3, height, width)  # get_params reads only the size
        top, left, h, w = T.RandomResizedCrop.get_params(shape, list(self.scale), list(self.ratio))
        return torch.tensor([top, left, h, w, int(torch.rand(1).item() < self.hflip)])

    def reduction(self, params: torch.Tensor, height: int, width: int) -> int:
        crop = min(int(params[2]), int(params[3]))
        return next((s for s in DCT_SCALES if crop // s >= self.size), 1)

    def apply(self, x: torch.Tensor, params: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
        top, left, h, w = (round(int(v) * factor) for v in params[:4])
        x = self._resize(x[:, top:top + max(h, 1), left:left + max(w, 1)], (self.size, self.size))
        return F.horizontal_flip(x) if int(params[4]) else x


class ResizeCenterCrop(Augment):
    """The authors' evaluation: resize the short side to size / crop_pct (224 / 256 for the CNNs, 0.9 for the
    MLPs), then the centre size×size."""

    def __init__(self, size: int, interpolation: str, crop_pct: float):
        super().__init__(size, interpolation)
        self.crop_pct = crop_pct

    def reduction(self, params: torch.Tensor, height: int, width: int) -> int:
        return next((s for s in DCT_SCALES if min(height, width) // s >= round(self.size / self.crop_pct)), 1)

    def apply(self, x: torch.Tensor, params: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
        short, (h, w) = round(self.size / self.crop_pct), x.shape[1:]
        size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)  # as torchvision's Resize
        return F.center_crop(self._resize(x, size), [self.size])


class ReidAugment(Augment):
    """Person crops are tall: resize to a square; in training also flip, pad by size/16 and crop back."""

    def __init__(self, size: int, interpolation: str, hflip: float | None):
        super().__init__(size, interpolation)
        self.hflip, self.pad = hflip, max(1, size // 16)

    def draw(self, height: int, width: int) -> torch.Tensor:
        if self.hflip is None:
            return torch.zeros(0, dtype=torch.int64)
        flip = int(torch.rand(1).item() < self.hflip)
        return torch.cat([torch.tensor([flip]), torch.randint(0, 2 * self.pad + 1, (2,))])

    def reduction(self, params: torch.Tensor, height: int, width: int) -> int:
        return next((s for s in DCT_SCALES if min(height, width) // s >= self.size), 1)

    def apply(self, x: torch.Tensor, params: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
        x = self._resize(x, (self.size, self.size))
        if not len(params):
            return x
        flip, top, left = (int(v) for v in params)
        x = F.horizontal_flip(x) if flip else x
        return F.crop(F.pad(x, [self.pad]), top, left, self.size, self.size)


def build_augment(img_size: int, train: bool, augment: AugmentConfig | None = None,
                  reid: bool = False) -> Augment | None:
    """The authors' standard pipeline as an `Augment`, or None for timm's stack (`augment.kind == "timm"`,
    training only: RandAugment and friends work on PIL images, so those trials decode on the CPU)."""
    aug = augment or AugmentConfig()
    if train and aug.kind == "timm":
        return None
    if reid:
        return ReidAugment(img_size, aug.interpolation, aug.hflip if train else None)
    return (RandomResizedCropFlip(img_size, aug.interpolation, aug.crop_scale, aug.crop_ratio, aug.hflip) if train
            else ResizeCenterCrop(img_size, aug.eval_interpolation, aug.eval_crop_pct))


def decode(data: bytes, reduction: int = 1) -> tuple[torch.Tensor, float]:
    """(uint8 RGB (3, H, W), the decoded size / the stored size): libjpeg-turbo through torchvision, or
    through Pillow's draft mode when the image may be decoded `reduction` times smaller."""
    if reduction == 1:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB), 1.0
    with Image.open(io.BytesIO(data)) as img:
        width = img.width
        img.draft("RGB", (math.ceil(img.width / reduction), math.ceil(img.height / reduction)))
        rgb = np.asarray(img.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1), rgb.shape[1] / width


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device | None = None) -> Iterator[None]:
    """Run under `seed`, leaving the generators as they were. Without `device`: torch's CPU generator only
    (all that `Augment.draw` uses, and far cheaper than `torch.manual_seed`, which seeds every GPU too); with
    it: that device's torch generator, Python's and NumPy's too (timm's transforms and Random Erasing)."""
    if seed is None:
        yield
        return
    if device is None:
        state = torch.default_generator.get_state()
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            torch.default_generator.set_state(state)
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        py_state, np_state = random.getstate(), np.random.get_state()
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class PreparedDataset(Dataset):
    """One split of a prepared folder. Items are addressed by `(index, seed)` from `SeededSampler` (or a
    plain index, then unseeded) and are `(image, params, label[, pid, camid], seconds)`: the image as uint8
    (3, S, S), or with `device_decode` its JPEG bytes and the drawn `params`; `seconds` is the time the item
    took, which the loader sums into its throughput."""

    def __init__(self, data_dir: str | Path, split: str, augment: Augment | None = None, timm_transform: Any = None,
                 device_decode: bool = False):
        self.classes, self.stats = read_meta(data_dir)
        self.index = read_split(data_dir, split)
        self.reader = ShardReader(Path(data_dir))
        self.reid = self.stats.get("task") == "reid"
        self.augment, self.timm_transform = augment, timm_transform
        self.device_decode = device_decode and augment is not None
        self.labels = self.index.label.tolist()

    def __len__(self) -> int:
        return len(self.index)

    def image_bytes(self, index: int) -> bytes:
        ix = self.index
        return self.reader.read(ix.shards[ix.shard[index]], int(ix.offset[index]), int(ix.size[index]))

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, ...]:
        start = time.perf_counter()
        index, seed = key if isinstance(key, tuple) else (key, None)
        data = self.image_bytes(index)
        height, width = int(self.index.height[index]), int(self.index.width[index])
        if self.augment is None:  # timm's stack; params: the seed of the batch's Random Erasing
            with seeded(seed, CPU), Image.open(io.BytesIO(data)) as img:
                params = torch.randint(0, 2**62, (1,))
                x = torch.as_tensor(np.asarray(self.timm_transform(img.convert("RGB"))))
        else:
            with seeded(seed):
                params = self.augment.draw(height, width)
            if self.device_decode:
                x = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            else:
                img, factor = decode(data, self.augment.reduction(params, height, width))
                x = self.augment.apply(img, params, factor)
        extra = (int(self.index.pid[index]), int(self.index.camid[index])) if self.reid else ()
        return x, params, self.labels[index], *extra, time.perf_counter() - start


def collate(samples: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Decoded images stacked (straight into shared memory in a worker); JPEG bytes (1-D, for decoding on the
    device) kept as a list."""
    images = [s[0] for s in samples]
    return (images if images[0].ndim == 1 else default_collate(images), *default_collate([s[1:] for s in samples]))


class SeededSampler(Sampler):
    """Yields `(index, sample_seed)`: a (shuffled) order and one augmentation seed per sample, both drawn
    from a generator that `set_epoch` seeds from (seed, epoch), so epochs differ but repeat exactly.

    With `repeats` > 1 each image of the order comes `repeats` times in a row, each copy under its own seed, and
    an epoch stops after `n` samples: DeiT's repeated augmentation (its RASampler, timm's RepeatAugSampler), whose
    copies `ShardSampler` deals to different data-parallel workers as they do. Those samplers yield bare indices
    and read torch.distributed, so they cannot carry the per-sample seeds this loader repeats runs by."""

    def __init__(self, n: int, shuffle: bool, seed: int, repeats: int = 1):
        self.n, self.shuffle, self.seed, self.repeats = n, shuffle, seed, repeats
        self.generator = torch.Generator().manual_seed(seed)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(mix_seed(self.seed, epoch, 1))

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        order = order.repeat_interleave(self.repeats)[:self.n]
        seeds = torch.randint(0, 2**62, (self.n,), generator=self.generator)
        return iter(zip(order.tolist(), seeds.tolist()))


class ShardSampler(Sampler):
    """One data-parallel worker's share of another sampler's order: every `size`-th item from `rank`. With
    `pad` the order is first padded (wrapping round) to a multiple of `size` so all workers take as many
    steps."""

    def __init__(self, base: SeededSampler, rank: int, size: int, pad: bool):
        self.base, self.rank, self.size, self.pad = base, rank, size, pad

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.base)
        return math.ceil(n / self.size) if self.pad else len(range(self.rank, n, self.size))

    def __iter__(self) -> Iterator[Any]:
        items = list(self.base)
        if self.pad and len(items) % self.size:
            items += items[:self.size - len(items) % self.size]
        return iter(items[self.rank::self.size])


class Loader:
    """Batches of a `DataLoader` made ready on `device`: decoded there (with `device_decode`), standardised
    to float with `mean` and `std` (None: the dataset's stats.json), random-erased (timm recipes). `throughput`
    says how fast its workers produce images."""

    def __init__(self, loader: DataLoader, dataset: PreparedDataset, device: torch.device,
                 erase: RandomErasing | None, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None):
        self.loader, self.dataset, self.device, self.erase = loader, dataset, device, erase
        self.mean, self.std = (torch.tensor(given or dataset.stats[k], device=device).view(1, 3, 1, 1) * 255
                               for k, given in (("mean", mean), ("std", std)))
        self._busy, self._images = 0.0, 0

    @property
    def sampler(self) -> Sampler:
        return self.loader.sampler

    @property
    def drop_last(self) -> bool:
        return self.loader.drop_last

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.sampler.set_epoch(epoch)

    def throughput(self) -> float:
        """Images per second its workers together can produce (from their busy time per image), since the
        last call: beside the trainer's images/s, it says whether a trial is loader-bound."""
        busy, images = self._busy, self._images
        self._busy, self._images = 0.0, 0
        return images / busy * max(self.loader.num_workers, 1) if busy else 0.0

    def _ready(self, images: Any, params: torch.Tensor) -> torch.Tensor:
        if isinstance(images, list):
            decoded = decode_jpeg(images, mode=ImageReadMode.RGB, device=self.device)
            images = torch.stack([self.dataset.augment.apply(x, p) for x, p in zip(decoded, params)])
        x = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        if self.erase is None:
            return x
        with seeded(int(params[0, 0]), self.device):
            return self.erase(x)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for images, params, *rest, seconds in self.loader:
            self._busy += float(seconds.sum())
            self._images += len(seconds)
            yield self._ready(images, params), *(t.to(self.device, non_blocking=True) for t in rest)


def build_loader(data_dir: str | Path, split: str, img_size: int, batch_size: int, train: bool,
                 augment: AugmentConfig | None = None, workers: int = 0, seed: int = 0,
                 shuffle: bool | None = None, device: torch.device | str = "cpu", device_decode: bool = False,
                 rank: int = 0, world_size: int = 1) -> Loader:
    """A loader over one split of a prepared dataset (see the module docstring for what it yields).

    `train` picks the augmentation (and drops a last partial batch, which BatchNorm cannot take when it
    holds one image); `shuffle` defaults to `train`. With `world_size` > 1 it yields the share of data-parallel
    worker `rank` (padded to equal steps when training).
    """
    if img_size < 8:
        raise ConfigError("img_size", img_size, "an integer >= 8")
    if batch_size < 1:
        raise ConfigError("batch_size", batch_size, "an integer >= 1")
    device = torch.device(device)
    classes, stats = read_meta(data_dir)
    reid = stats.get("task") == "reid"
    aug = augment or AugmentConfig()
    geometry = build_augment(img_size, train, aug, reid)
    timm_transform = None if geometry is not None else create_transform(
        img_size, is_training=True, hflip=aug.hflip, auto_augment=aug.auto_augment, scale=aug.crop_scale,
        ratio=aug.crop_ratio, color_jitter=aug.color_jitter or None, interpolation=aug.interpolation,
        use_prefetcher=True)
    dataset = PreparedDataset(data_dir, split, geometry, timm_transform, device_decode)
    sampler: Sampler = SeededSampler(len(dataset), train if shuffle is None else shuffle, seed,
                                     aug.repeats if train else 1)
    if world_size > 1:
        sampler = ShardSampler(sampler, rank, world_size, pad=train)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                        drop_last=train and len(dataset) > batch_size, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))
    erase = RandomErasing(aug.reprob, mode=aug.remode, device=device) if geometry is None and aug.reprob else None
    return Loader(loader, dataset, device, erase, aug.mean, aug.std)
