"""A generated ImageFolder tree that looks like ImageNet to a data loader: sizes, aspect ratios, file sizes.

Size model (a modelling choice for benchmarks, not measured ImageNet statistics): ImageNet's typical photo
has a 500-px long side, so 70 % of the images have long side 500, 20 % a long side drawn uniformly from
200-499 and 10 % from 501-1600 (the ones `prepare` shrinks to its 500-px cap). The aspect ratio is 4:3,
3:2 or 1:1 (equally likely), landscape three times in four, else portrait. The content is the built-in
shapes (`draw_shape`: a shape on a cluttered gradient) with extra per-pixel noise, so the JPEGs are about
as large as photos (roughly 60-150 KB at 500×375); they are saved as baseline JPEGs, quality 90, 4:2:0.

Image `i` depends only on (seed, i), and is written by a fork-server process pool, so the tree is the same
whatever the number of workers. Layout: `root/{train,val}/n0000000k/<i>.jpg`, every fifth image in `val`,
class `i // 5 % classes`.
"""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.builtin import SHAPES, draw_shape
from ..data.prepare import default_workers

ASPECTS = (4 / 3, 3 / 2, 1.0)


def class_name(k: int) -> str:
    """ImageNet-style folder name (WordNet id shape): n00000000, n00000001, …"""
    return f"n{k:08d}"


def image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of one image under the module's size model."""
    u = rng.random()
    long = 500 if u < 0.7 else int(rng.integers(200, 500)) if u < 0.9 else int(rng.integers(501, 1601))
    short = max(1, round(long / ASPECTS[int(rng.integers(len(ASPECTS)))]))
    return (long, short) if rng.random() < 0.75 else (short, long)


def relative_path(i: int, classes: int) -> Path:
    """Images come in blocks of five of one class, four train then one val: every class with images has
    training images (prepare rejects a val class without any)."""
    split = "val" if i % 5 == 4 else "train"
    return Path(split) / class_name(i // 5 % classes) / f"{i:07d}.jpg"


def write_one(task: tuple[str, int, int, int]) -> str:
    """Draw and save image `i` (runs in a pool worker); returns its path."""
    root, i, classes, seed = task
    rng = np.random.default_rng([seed, i])
    width, height = image_size(rng)
    img = draw_shape(SHAPES[i // 5 % classes % len(SHAPES)], max(width, height), rng).crop((0, 0, width, height))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(8, 20), (height, width, 3))
    path = Path(root) / relative_path(i, classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
        path, format="JPEG", quality=90, subsampling=2, optimize=False, progressive=False)
    return str(path)


def write_imagenet_like(root: Path, n: int, classes: int = 10, seed: int = 0,
                        workers: int | None = None) -> list[Path]:
    """`n` JPEGs in ImageFolder layout under `root` (80 % train, 20 % val, `classes` classes), written by
    `workers` processes (default: all cores); returns their paths in index order."""
    if n < 1 or classes < 1:
        raise ValueError(f"n and classes must be >= 1, got n={n}, classes={classes}")
    tasks = [(str(root), i, classes, seed) for i in range(n)]
    workers = default_workers() if workers is None else workers
    if workers <= 1 or n < 2:
        return [Path(p) for p in map(write_one, tasks)]
    chunk = max(1, min(16, n // (workers * 8)))
    with multiprocessing.get_context("forkserver").Pool(min(workers, n)) as pool:
        return [Path(p) for p in pool.imap(write_one, tasks, chunksize=chunk)]


def size_summary(paths: list[Path]) -> dict[str, float]:
    """count, mean long side (px), mean width and height, total MB of `paths` (reads only the headers)."""
    sizes = []
    for path in paths:
        with Image.open(path) as img:
            sizes.append(img.size)
    arr = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    return {"count": len(paths), "mean_long": float(arr.max(1).mean()) if len(arr) else 0.0,
            "mean_width": float(arr[:, 0].mean()) if len(arr) else 0.0,
            "mean_height": float(arr[:, 1].mean()) if len(arr) else 0.0,
            "mb": sum(p.stat().st_size for p in paths) / 1e6}


def describe(summary: dict[str, float]) -> str:
    return (f"{summary['count']:.0f} JPEGs, mean long side {summary['mean_long']:.0f} px, "
            f"{summary['mb']:.1f} MB ({summary['mb'] * 1e3 / max(summary['count'], 1):.0f} KB/image)")
