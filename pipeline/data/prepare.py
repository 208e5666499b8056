"""`python -m pipeline prepare`: build a prepared dataset folder from a source.

The output folder holds `images/<split>/…jpg` (short side resized to `resize`, re-encoded with fixed
JPEG settings), `manifest.csv`, `classes.json` and `stats.json`. Rows, classes and rejections are in a
sorted order and nothing time- or machine-dependent is written, so identical input and params give
byte-identical output (DVC's cache works). Decoding runs in a process pool with JPEG draft mode, and
the folder is built next to `out` and renamed into place, so a killed run never leaves half a dataset.
The folder also carries `MARKER`: prepare replaces only a folder that holds it (or an empty or new one),
so a mistyped `--out` can never delete files prepare did not write.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

from ..config import ConfigError, Params, PrepareConfig, parse, profile_datasets
from ..utils.progress import progress
from . import builtin
from .prepared import MARKER, is_replaceable, write_manifest, write_meta
from .sources import SOURCES, Item, Scan

SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the stored image by 90 degrees
RESAMPLE = Image.Resampling.BILINEAR  # antialiased (support scales with the shrink), as torchvision Resize


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def target_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(w, h) with the short side equal to `short` and the aspect ratio kept."""
    if width <= height:
        return short, max(1, round(height * short / width))
    return max(1, round(width * short / height)), short


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB. Pillow's `convert` clips wider values to 0..255 (a 16-bit photo turns white), so
    those are scaled first: 16-bit modes and `I` (0..65535 when read from a 16-bit file) by 1/257, and `F` by
    255, taking float images as 0..1 (their usual range); values outside the range clip."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        scale = 255 if img.mode == "F" else 1 / 257
        img = Image.fromarray(np.clip(np.rint(np.asarray(img, dtype=np.float32) * scale), 0, 255).astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


def convert(src: str, dst: str, resize: int, quality: int) -> dict[str, Any]:
    """Decode, turn upright (EXIF orientation), shrink and re-encode one image (runs in a worker process).

    Returns either {"error": reason} or the manifest fields plus exact integer pixel sums for the stats;
    sizes are those of the upright image.
    """
    try:
        data = Path(src).read_bytes()
    except OSError as err:
        return {"error": f"unreadable file: {err.strerror or err}"}
    if not data:
        return {"error": "empty file (0 bytes)"}
    try:
        with Image.open(io.BytesIO(data)) as img:
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            turned = orientation in SWAPPED_ORIENTATIONS
            orig = img.size[::-1] if turned else img.size
            size = target_size(*orig, resize)
            img.draft("RGB", size[::-1] if turned else size)  # JPEG: libjpeg decodes at 1/2, 1/4 or 1/8 scale
            img.load()
            rgb = to_rgb(img if orientation == 1 else ImageOps.exif_transpose(img))
        if rgb.size != size:
            rgb = rgb.resize(size, RESAMPLE)
    except Image.UnidentifiedImageError:
        return {"error": "not an image (no known image format)"}
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return {"error": f"not a readable image: {type(err).__name__}: {err}"}
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False, progressive=False)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_bytes(buf.getvalue())
    hist = np.asarray(rgb.histogram(), dtype=np.int64).reshape(3, 256)  # exact integer sums, cheap in C
    levels = np.arange(256, dtype=np.int64)
    return {"sha256": hashlib.sha256(data).hexdigest(), "orig_width": orig[0], "orig_height": orig[1],
            "width": size[0], "height": size[1], "npix": size[0] * size[1],
            "sum": (hist @ levels).tolist(), "sumsq": (hist @ (levels * levels)).tolist()}


def _convert_task(task: tuple[str, str, int, int]) -> dict[str, Any]:
    return convert(*task)


def convert_all(tasks: list[tuple[str, str, int, int]], workers: int, desc: str) -> list[dict[str, Any]]:
    """`convert` over all tasks in input order, in `workers` processes. They are started by a fork server,
    not forked from the caller: a caller with threads of its own (torch, MLflow, Ray; a test process) can be
    forked while one of them holds a lock, and the copy then waits on it forever."""
    if workers <= 1 or len(tasks) < 2:
        return list(progress(map(_convert_task, tasks), len(tasks), desc))
    chunk = max(1, min(32, len(tasks) // (workers * 8)))
    with multiprocessing.get_context("forkserver").Pool(workers) as pool:
        return list(progress(pool.imap(_convert_task, tasks, chunksize=chunk), len(tasks), desc))


def _mean_std(results: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units from exact integer sums (order-independent)."""
    n = sum(r["npix"] for r in results)
    mean = [sum(r["sum"][c] for r in results) / n / 255 for c in range(3)]
    sq = [sum(r["sumsq"][c] for r in results) / n / 255**2 for c in range(3)]
    std = [max(q - m * m, 0.0) ** 0.5 for q, m in zip(sq, mean)]
    return [round(m, 6) for m in mean], [round(v, 6) for v in std]


def build(scan: Scan, root: Path, out: Path, cfg: PrepareConfig, workers: int) -> dict[str, Any]:
    """Convert `scan`'s images into `out` (an empty folder) and write manifest, classes and stats."""
    tasks = [(str(root / it.src), str(out / it.dst), cfg.resize, cfg.quality) for it in scan.items]
    results = convert_all(tasks, workers, f"prepare {cfg.source}")
    good: list[tuple[Item, dict[str, Any]]] = []
    for item, res in zip(scan.items, results):
        if "error" in res:
            scan.reject(item.src, res["error"])
        else:
            good.append((item, res))
    train_split = scan.splits[0]
    classes = sorted({it.cls for it, _ in good if it.split == train_split},
                     key=lambda c: (int(c), c) if scan.task == "reid" else (0, c))
    index = {c: i for i, c in enumerate(classes)}
    if scan.task == "classification":
        for item, _ in good:
            if item.cls not in index:
                scan.reject(item.src, f"class {item.cls!r} has no usable training image")
                (out / item.dst).unlink()
        good = [(it, r) for it, r in good if it.cls in index]
    if not classes:
        raise ConfigError("root", str(root), f"at least one readable image in the {train_split} split; found "
                          f"none usable ({len(scan.rejected)} rejected, e.g. {scan.rejected[:3]})")
    order = {s: i for i, s in enumerate(scan.splits)}
    good.sort(key=lambda g: (order[g[0].split], g[0].dst))
    columns = ["path", "label", "split", "class", "sha256", "orig_width", "orig_height", "width", "height",
               "src"] + (["pid", "camid"] if scan.task == "reid" else [])
    write_manifest(out, columns, [{"path": item.dst, "label": index.get(item.cls, -1), "split": item.split,
                                   "class": item.cls, "src": item.src, "pid": item.pid, "camid": item.camid, **res}
                                  for item, res in good])
    mean, std = _mean_std([r for it, r in good if it.split == train_split])
    counts: dict[str, Any] = {}
    for split in scan.splits:
        per_class: dict[str, int] = {}
        for item, _ in good:
            if item.split == split:
                per_class[item.cls] = per_class.get(item.cls, 0) + 1
        counts[split] = {"images": sum(per_class.values()), "per_class": per_class}
        if scan.task == "reid":
            counts[split]["ids"] = len([c for c in per_class if int(c) > 0])
            counts[split]["junk"] = per_class.get("-1", 0)
            counts[split]["distractors"] = sum(n for c, n in per_class.items() if int(c) == 0)
    stats = {"task": scan.task, "source": cfg.source, "resize": cfg.resize, "quality": cfg.quality,
             "splits": list(scan.splits), "num_classes": len(classes), "counts": counts,
             "mean": mean, "std": std, "stats_split": train_split,
             "rejected": sorted(scan.rejected, key=lambda r: (r["path"], r["reason"]))}
    if cfg.source.startswith("builtin"):
        stats["builtin"] = {k: getattr(cfg.builtin, k) for k in cfg.builtin.__dataclass_fields__}
    write_meta(out, classes, stats)
    return stats


def check_out(out: Path) -> None:
    """Refuse an `out` (resolved) whose replacement would delete files prepare did not write."""
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        found = "the working folder" if out == cwd else "a parent of the working folder"
    elif out == Path.home().resolve():
        found = "the home folder"
    elif out.exists() and not out.is_dir():
        found = "a file"
    elif out.exists() and not is_replaceable(out):
        found = f"a folder with files that prepare did not write (no {MARKER})"
    else:
        return
    raise ConfigError("out", str(out), f"a folder that does not exist yet, an empty folder, or one prepare built "
                      f"(it holds {MARKER}), since prepare replaces the whole folder; found {found}, so nothing "
                      "was touched")


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by the finished `tmp` folder with renames (atomic on one file system).

    `out` is checked again (conversion took time), and the old folder is deleted only if, renamed aside,
    it is still one prepare may replace; otherwise it stays, renamed, rather than be lost.
    """
    check_out(out)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if is_replaceable(old):
        shutil.rmtree(old, ignore_errors=True)


def prepare(cfg: PrepareConfig, workers: int | None = None) -> dict[str, Any]:
    """Build `cfg.out` from `cfg.source`; returns the stats written to stats.json."""
    workers = default_workers() if workers is None else workers
    out = Path(cfg.out).resolve()
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-", dir=out.parent) as staging:
        staging_path = Path(staging)
        if cfg.source.startswith("builtin"):
            root = staging_path / "generated"
            reid = cfg.source == "builtin_reid"
            print(f"prepare {cfg.source}: generating {'persons' if reid else 'shapes'}", file=sys.stderr)
            (builtin.write_persons if reid else builtin.write_shapes)(root, cfg.builtin)
            scan = SOURCES["market1501" if reid else "imagefolder"](root)
        else:
            root = Path(cfg.root).absolute()
            scan = SOURCES[cfg.source](root)
        built = staging_path / "out"
        built.mkdir()
        stats = build(scan, root, built, cfg, workers)
        _swap_in(built, out)
    n = sum(c["images"] for c in stats["counts"].values())
    print(f"prepare {cfg.source}: {n} images, {len(stats['rejected'])} rejected, "
          f"{time.perf_counter() - start:.1f}s -> {out}", file=sys.stderr)
    return stats


def prepare_stage(params: Params, names: list[str]) -> None:
    """The DVC stage `prepare`: the active profile's datasets, or those named."""
    for name, cfg in profile_datasets(params, names).items():
        try:
            prepare(cfg)
        except ConfigError as err:
            raise err.under(f"datasets.{name}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="where the images come from (PrepareConfig.source)")
    parser.add_argument("--root", help="source folder (imagefolder, market1501)")
    parser.add_argument("--out", required=True, help=f"output folder: new, empty or built by prepare (holds {MARKER}); "
                        "replaced atomically")
    parser.add_argument("--resize", type=int, default=PrepareConfig.resize, help="short side in pixels")
    parser.add_argument("--quality", type=int, default=PrepareConfig.quality, help="JPEG quality of the copies")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in datasets")
    parser.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")


def run(args: argparse.Namespace) -> int:
    cfg = parse(PrepareConfig, {"source": args.source, "root": args.root, "out": args.out,
                                "resize": args.resize, "quality": args.quality,
                                "builtin": {"seed": args.seed}}, "prepare")
    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers", args.workers, "an integer >= 1")
    prepare(cfg, args.workers)
    return 0
