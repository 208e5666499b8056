"""`python -m pipeline bench-prepare`: prepare throughput against a plain one-process PIL loop.

Generates ImageNet-like JPEGs in a temp folder (imagenet_like.py: varied sizes, mostly 500-px long sides),
then times, side by side on the same files: the plain loop (open → convert → resize → save, one process,
PIL defaults), `prepare` with one process (JPEG draft mode, antialiased bilinear resize) and `prepare`
with all workers (the same plus processes; it also hashes, checks and computes stats). It also times
decoding the prepared copies (read from their shards, decoded as the loader does) against decoding the
sources with PIL (what a loader pays per image and epoch).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from ..config import ConfigError, PrepareConfig
from ..data.loaders import decode
from ..data.prepare import default_workers, prepare, target_size
from ..data.prepared import read_split
from ..data.shards import ShardReader
from .imagenet_like import describe, size_summary, write_imagenet_like
from .timing import timed_in_turns


def plain_loop(paths: list[Path], out: Path, resize: int, max_side: int | None, quality: int) -> None:
    """What one would write without the stage: one process, full-size decode, PIL's default resize
    (bicubic), save."""
    out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        rgb.resize(target_size(*rgb.size, resize, max_side)).save(out / f"{i:05d}.jpg", quality=quality)


def read_all(paths: list[Path]) -> None:
    for path in paths:
        with Image.open(path) as img:
            img.convert("RGB")


def read_prepared(data_dir: Path) -> int:
    """Decode every stored image of a prepared folder as the loader does (one pread from its shard, then
    libjpeg-turbo); returns how many."""
    reader, n = ShardReader(data_dir), 0
    for split in ("train", "val"):
        ix = read_split(data_dir, split)
        for shard, offset, size in zip(ix.shard.tolist(), ix.offset.tolist(), ix.size.tolist()):
            decode(reader.read(ix.shards[shard], offset, size))
        n += len(ix)
    return n


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
        paths = write_imagenet_like(src, args.images, workers=workers)
        print(f"{describe(size_summary(paths))} generated (ImageNet-like) in {time.perf_counter() - t:.1f}s; "
              f"{workers} workers; best of {args.repeats}")

        print(f"load average before: {os.getloadavg()[0]:.1f} (other processes share the cores: wall figures "
              f"are best of {args.repeats}, CPU ms/image is load-independent)")
        print(f"{'resize':>6} {'plain PIL loop':>15} {'prepare 1 proc':>15} {f'prepare {workers} proc':>15} "
              f"{'speed-up':>9} {'read prepared':>14} {'read source':>12}   (images/s, wall)")
        for size in sizes:
            cfg = PrepareConfig(source="imagefolder", root=str(src), out=str(Path(tmp) / f"out{size}"),
                                resize=size, quality=quality)
            methods = {
                "plain": lambda: plain_loop(paths, Path(tmp) / f"plain{size}", size, cfg.max_side, quality),
                "one": lambda: prepare(cfg, workers=1),
                "many": lambda: prepare(cfg, workers=workers),
                "read_source": lambda: read_all(paths),
            }
            times = timed_in_turns(methods, args.repeats)
            times |= timed_in_turns({"read_prepared": lambda: read_prepared(Path(cfg.out))}, args.repeats)
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
