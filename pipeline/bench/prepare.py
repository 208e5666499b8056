"""`python -m pipeline bench-prepare`: prepare throughput against a plain one-process PIL loop.

Generates realistic-size JPEGs (500×375 by default, ImageNet's typical size) in a temp folder, then
times, side by side on the same files: the plain loop (open → convert → resize → save, one process,
PIL defaults), `prepare` with one process (JPEG draft mode, antialiased bilinear resize) and `prepare`
with all workers (the same plus processes; it also hashes, checks and computes stats). It also times
decoding the prepared copies against the sources (what a loader pays per image and epoch).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import ConfigError, PrepareConfig
from ..data.builtin import SHAPES, draw_shape
from ..data.prepare import default_workers, prepare, target_size
from .timing import timed_in_turns


def make_images(root: Path, n: int, width: int, height: int) -> list[Path]:
    """`n` noisy, cluttered photos-like JPEGs in ImageFolder layout (4 classes, 80 % train)."""
    paths = []
    for i in range(n):
        kind = SHAPES[i % 4]
        split = "train" if i % 5 else "val"
        img = draw_shape(kind, max(width, height), np.random.default_rng([7, i])).crop((0, 0, width, height))
        path = root / split / kind / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
        paths.append(path)
    return paths


def plain_loop(paths: list[Path], out: Path, resize: int, quality: int) -> None:
    """What one would write without the stage: one process, full-size decode, PIL's default resize
    (bicubic), save."""
    out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        rgb.resize(target_size(*rgb.size, resize)).save(out / f"{i:05d}.jpg", quality=quality)


def read_all(paths: list[Path]) -> None:
    for path in paths:
        with Image.open(path) as img:
            img.convert("RGB")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=300, help="number of generated JPEGs")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--resize", default="256,80", help="comma-separated short sides to time")
    parser.add_argument("--workers", type=int, default=None, help="prepare processes (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many interleaved runs per method")


def run(args: argparse.Namespace) -> int:
    if args.images < 2:
        raise ConfigError("--images", args.images, "an integer >= 2")
    try:
        sizes = [int(s) for s in args.resize.split(",") if s]
    except ValueError:
        raise ConfigError("--resize", args.resize, "comma-separated integers, e.g. 256,80") from None
    workers = args.workers or default_workers()
    quality = PrepareConfig.quality
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        src = Path(tmp) / "src"
        t = time.perf_counter()
        paths = make_images(src, args.images, args.width, args.height)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{args.images} JPEGs {args.width}x{args.height} ({mb:.1f} MB) generated in "
              f"{time.perf_counter() - t:.1f}s; {workers} workers; best of {args.repeats}")

        print(f"load average before: {os.getloadavg()[0]:.1f} (other processes share the cores: wall figures "
              f"are best of {args.repeats}, CPU ms/image is load-independent)")
        print(f"{'resize':>6} {'plain PIL loop':>15} {'prepare 1 proc':>15} {f'prepare {workers} proc':>15} "
              f"{'speed-up':>9} {'read prepared':>14} {'read source':>12}   (images/s, wall)")
        for size in sizes:
            cfg = PrepareConfig(source="imagefolder", root=str(src), out=str(Path(tmp) / f"out{size}"),
                                resize=size, quality=quality)
            methods = {
                "plain": lambda: plain_loop(paths, Path(tmp) / f"plain{size}", size, quality),
                "one": lambda: prepare(cfg, workers=1),
                "many": lambda: prepare(cfg, workers=workers),
                "read_source": lambda: read_all(paths),
            }
            times = timed_in_turns(methods, args.repeats)
            prepared = sorted((Path(cfg.out) / "images").rglob("*.jpg"))
            times |= timed_in_turns({"read_prepared": lambda: read_all(prepared)}, args.repeats)
            best = {name: (min(t.wall for t in ts), min(t.cpu for t in ts)) for name, ts in times.items()}
            n = len(paths)
            wall = {k: v[0] for k, v in best.items()}
            print(f"{size:>6} {n / wall['plain']:>15.0f} {n / wall['one']:>15.0f} {n / wall['many']:>15.0f} "
                  f"{wall['plain'] / wall['many']:>8.2f}x {n / wall['read_prepared']:>14.0f} "
                  f"{n / wall['read_source']:>12.0f}", flush=True)
            print(f"{'':>6} {best['plain'][1] / n * 1e3:>15.2f} {best['one'][1] / n * 1e3:>15.2f} "
                  f"{best['many'][1] / n * 1e3:>15.2f} {'':>9} {best['read_prepared'][1] / n * 1e3:>14.2f} "
                  f"{best['read_source'][1] / n * 1e3:>12.2f}   (CPU ms/image)", flush=True)
    return 0
