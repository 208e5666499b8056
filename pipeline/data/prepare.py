"""`python -m pipeline prepare`: build a prepared dataset folder from a source.

The output folder holds the images in tar shards (see shards.py; stored size: `PrepareConfig`), plus
`manifest.csv`, `classes.json` and `stats.json` (format: prepared.py). Images are converted in a process
pool in their final order (split, then source path) and appended to shards as they arrive, so memory
stays flat at ImageNet's size. Nothing time- or machine-dependent is written: identical input and params
give byte-identical output (DVC's cache works).

Work happens in `.<out>.partial` beside `out`: each finished shard is recorded there, so a killed run
started again with the same inputs and params resumes after the last finished shard. The finished folder is
renamed into place, so `out` never holds half a dataset. It carries `MARKER`: prepare replaces only a
folder that holds it (or an empty or new one), so a mistyped `--out` can never delete files prepare did
not write. It never replaces a folder a training is reading, and a second prepare into the same `out` is
refused while the first runs (lock.py).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

from ..config import ConfigError, Params, PrepareConfig, parse, profile_datasets, to_dict
from ..utils.io import require_writable
from ..utils.progress import progress
from . import builtin
from .lock import data_lock, prepare_lock
from .prepared import MARKER, is_replaceable, write_manifest, write_meta
from .shards import ShardWriter
from .sources import SOURCES, Item, Scan, read_class_list, scan_imagefolder

SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that turn the stored image by 90 degrees
RESAMPLE = Image.Resampling.BILINEAR  # antialiased (support scales with the shrink), as torchvision Resize
JOB = "job.json"  # in the staging folder: what is being built, so a restart resumes only the same job


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def target_size(width: int, height: int, resize: int | None, max_side: int | None) -> tuple[int, int]:
    """(w, h) of the stored copy: the short side scaled to `resize` (if set), then the long side capped at
    `max_side` (if set); the aspect ratio kept."""
    scale = resize / min(width, height) if resize else 1.0
    if max_side and max(width, height) * scale > max_side:
        scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as 8-bit RGB. Pillow's `convert` clips wider values to 0..255 (a 16-bit photo turns white), so
    those are scaled first: 16-bit modes and `I` (0..65535 when read from a 16-bit file) by 1/257, and `F` by
    255, taking float images as 0..1 (their usual range); values outside the range clip."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        scale = 255 if img.mode == "F" else 1 / 257
        img = Image.fromarray(np.clip(np.rint(np.asarray(img, dtype=np.float32) * scale), 0, 255).astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


def convert(src: str, resize: int | None, max_side: int | None, quality: int) -> dict[str, Any]:
    """Decode, turn upright (EXIF orientation), shrink and re-encode one image (runs in a worker process).

    Returns either {"error": reason} or the JPEG bytes (`data`), the manifest fields and exact integer
    pixel sums for the stats; sizes are those of the upright image.
    """
    try:
        data = Path(src).read_bytes()
    except FileNotFoundError:  # listed a moment ago: a symbolic link to nothing, or deleted since
        return {"error": f"unreadable file: {'broken symbolic link' if os.path.islink(src) else 'deleted'}"}
    except OSError as err:
        return {"error": f"unreadable file: {err.strerror or err}"}
    if not data:
        return {"error": "empty file (0 bytes)"}
    try:
        with Image.open(io.BytesIO(data)) as img:
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
            turned = orientation in SWAPPED_ORIENTATIONS
            orig = img.size[::-1] if turned else img.size
            size = target_size(*orig, resize, max_side)
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
    rgb.save(buf, format="JPEG", quality=quality, subsampling=2, optimize=False, progressive=False)
    hist = np.asarray(rgb.histogram(), dtype=np.int64).reshape(3, 256)  # exact integer sums, cheap in C
    levels = np.arange(256, dtype=np.int64)
    return {"data": buf.getvalue(), "sha256": hashlib.sha256(data).hexdigest(), "orig_width": orig[0],
            "orig_height": orig[1], "width": size[0], "height": size[1], "npix": size[0] * size[1],
            "sum": (hist @ levels).tolist(), "sumsq": (hist @ (levels * levels)).tolist()}


def _convert_task(task: tuple[str, int | None, int | None, int]) -> dict[str, Any]:
    return convert(*task)


def convert_all(tasks: list[tuple[str, int | None, int | None, int]], workers: int,
                desc: str) -> Iterator[dict[str, Any]]:
    """`convert` over all tasks, yielded in input order as they finish, from `workers` processes. They are
    started by a fork server, not forked from the caller: a caller with threads of its own (torch, MLflow,
    Ray; a test process) can be forked while one of them holds a lock, and the copy then waits on it forever."""
    if workers <= 1 or len(tasks) < 2:
        yield from progress(map(_convert_task, tasks), len(tasks), desc)
        return
    chunk = max(1, min(32, len(tasks) // (workers * 8)))
    with multiprocessing.get_context("forkserver").Pool(workers) as pool:
        yield from progress(pool.imap(_convert_task, tasks, chunksize=chunk), len(tasks), desc)


def _mean_std(npix: int, sums: np.ndarray, sumsq: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units from exact integer sums (order-independent)."""
    mean = [int(s) / npix / 255 for s in sums]
    sq = [int(q) / npix / 255**2 for q in sumsq]
    std = [max(q - m * m, 0.0) ** 0.5 for q, m in zip(sq, mean)]
    return [round(m, 6) for m in mean], [round(v, 6) for v in std]


class Staging:
    """The `.<out>.partial` folder: `out/` (being built), `done/NNNNN.json` (one per finished shard: its
    rows, the rejections before it and how far through the inputs it reaches) and `JOB`."""

    def __init__(self, out: Path, job: dict[str, Any]):
        self.root = out.with_name(f".{out.name}.partial")
        self.built, self.done_dir = self.root / "out", self.root / "done"
        job_file = self.root / JOB
        if self.root.exists():
            if not job_file.is_file():
                raise ConfigError("out", str(out), f"a folder beside which {self.root} is prepare's own work "
                                  f"folder; {self.root} exists without {JOB}, so nothing was touched")
            if json.loads(job_file.read_text(encoding="utf-8")) != job or not self.built.is_dir():
                shutil.rmtree(self.root)
        if not self.root.exists():
            self.done_dir.mkdir(parents=True)
            self.built.mkdir()
            job_file.write_text(json.dumps(job, sort_keys=True), encoding="utf-8")
        self.records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(self.done_dir.glob("*.json"))]
        for name in {p.relative_to(self.built).as_posix() for p in self.built.glob("shards/*.tar")} - {
                r["shard"] for r in self.records}:
            (self.built / name).unlink()  # begun by a killed run: written again

    def record(self, entry: dict[str, Any]) -> None:
        """Mark everything up to `entry["end"]` done (written atomically: a torn record is never read)."""
        path = self.done_dir / f"{len(self.records):05d}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry, sort_keys=True), encoding="utf-8")
        tmp.replace(path)
        self.records.append(entry)


def _job(scan: Scan, root: Path, items: list[Item], cfg: PrepareConfig) -> dict[str, Any]:
    """What is being built: the storing params and every input with its size and mtime."""
    digest = hashlib.sha256()
    for item in items:
        try:
            st = (root / item.src).stat()
            state = f"{st.st_size}\t{st.st_mtime_ns}"
        except OSError as err:  # a dangling symlink: rejected when converted, and a new job once it resolves
            state = f"unreadable {err.errno}"
        digest.update(f"{item.split}\t{item.cls}\t{item.src}\t{state}\n".encode())
    return {"source": cfg.source, "resize": cfg.resize, "max_side": cfg.max_side, "quality": cfg.quality,
            "shard_mb": cfg.shard_mb, "builtin": to_dict(cfg.builtin), "task": scan.task, "inputs": digest.hexdigest()}


def write_shards(scan: Scan, root: Path, staging: Staging, items: list[Item], cfg: PrepareConfig,
                 workers: int) -> None:
    """Convert `items` (in final order) into shards, recording each finished one in `staging`."""
    train_split = scan.splits[0]
    start = staging.records[-1]["end"] if staging.records else 0
    written = sum(len(r["rows"]) for r in staging.records)
    train_classes = {row["class"] for r in staging.records for row in r["rows"] if row["split"] == train_split}
    if start:
        print(f"prepare {cfg.source}: resuming after {len(staging.records)} finished shards "
              f"({start} of {len(items)} inputs done)", file=sys.stderr)
    writer: ShardWriter | None = None
    split = ""
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, str]] = []
    sums = np.zeros((2, 3), dtype=np.int64)
    npix = 0

    def finish(end: int) -> None:
        nonlocal writer, rows, rejected, sums, npix
        if writer is not None:
            writer.close()
        staging.record({"end": end, "shard": writer.path.relative_to(staging.built).as_posix() if writer else None,
                        "rows": rows, "rejected": rejected, "npix": npix, "sums": sums.tolist()})
        writer, rows, rejected, sums, npix = None, [], [], np.zeros((2, 3), dtype=np.int64), 0

    limit = cfg.shard_mb * 2**20
    tasks = [(str(root / it.src), cfg.resize, cfg.max_side, cfg.quality) for it in items[start:]]
    for i, (item, res) in enumerate(zip(items[start:], convert_all(tasks, workers, f"prepare {cfg.source}")),
                                    start):
        if writer is not None and (item.split != split or writer.size + len(res.get("data", b"")) > limit):
            finish(i)
        if "error" in res:
            rejected.append({"path": item.src, "reason": res["error"]})
            continue
        if scan.task == "classification" and item.split != train_split and item.cls not in train_classes:
            rejected.append({"path": item.src, "reason": f"class {item.cls!r} has no usable training image"})
            continue
        if writer is None:
            split = item.split
            number = sum(1 for r in staging.records if (r["shard"] or "").startswith(f"shards/{split}-"))
            writer = ShardWriter(staging.built / "shards" / f"{split}-{number:05d}.tar")
        offset = writer.add(f"{written:09d}", res["data"])
        written += 1
        if item.split == train_split:
            train_classes.add(item.cls)
            npix += res["npix"]
            sums += np.asarray([res["sum"], res["sumsq"]], dtype=np.int64)
        rows.append({"path": item.src, "split": item.split, "class": item.cls, "pid": item.pid, "camid": item.camid,
                     "shard": writer.path.relative_to(staging.built).as_posix(), "offset": offset,
                     "size": len(res["data"]), **{k: res[k] for k in ("sha256", "orig_width", "orig_height",
                                                                      "width", "height")}})
    finish(len(items))


def build(scan: Scan, root: Path, staging: Staging, items: list[Item], cfg: PrepareConfig,
          workers: int) -> dict[str, Any]:
    """Shards, then manifest, classes and stats in `staging.built` (from the records, in order)."""
    write_shards(scan, root, staging, items, cfg, workers)
    train_split = scan.splits[0]
    for record in staging.records:
        for entry in record["rejected"]:
            scan.reject(entry["path"], entry["reason"])
    rows = [row for record in staging.records for row in record["rows"]]
    trained = {row["class"] for row in rows if row["split"] == train_split}
    classes = list(scan.classes) if scan.classes is not None else \
        sorted(trained, key=lambda c: (int(c), c) if scan.task == "reid" else (0, c))
    if (untrained := [c for c in classes if c not in trained]) and scan.classes is not None:
        raise ConfigError("classes", untrained[0], "a listed class with at least one readable training image (its "
                          "label would never be trained); every one of its training files was rejected")
    if not classes:
        raise ConfigError("root", str(root), f"at least one readable image in the {train_split} split; found "
                          f"none usable ({len(scan.rejected)} rejected, e.g. {scan.rejected[:3]})")
    index = {c: i for i, c in enumerate(classes)}
    columns = ["path", "label", "split", "class", "sha256", "orig_width", "orig_height", "width", "height",
               "shard", "offset", "size"] + (["pid", "camid"] if scan.task == "reid" else [])
    write_manifest(staging.built, columns, [{**row, "label": index.get(row["class"], -1)} for row in rows])
    npix = sum(r["npix"] for r in staging.records)
    sums = np.sum([r["sums"] for r in staging.records], axis=0, dtype=np.int64)
    mean, std = _mean_std(npix, sums[0], sums[1])
    counts: dict[str, Any] = {}
    for split in scan.splits:
        per_class: dict[str, int] = {}
        for row in rows:
            if row["split"] == split:
                per_class[row["class"]] = per_class.get(row["class"], 0) + 1
        counts[split] = {"images": sum(per_class.values()), "per_class": per_class}
        if scan.task == "reid":
            counts[split]["ids"] = len([c for c in per_class if int(c) > 0])
            counts[split]["junk"] = per_class.get("-1", 0)
            counts[split]["distractors"] = sum(n for c, n in per_class.items() if int(c) == 0)
    stats = {"task": scan.task, "source": cfg.source, "resize": cfg.resize, "max_side": cfg.max_side,
             "quality": cfg.quality, "splits": list(scan.splits), "num_classes": len(classes), "counts": counts,
             "shards": sorted({row["shard"] for row in rows}), "mean": mean, "std": std, "stats_split": train_split,
             "rejected": sorted(scan.rejected, key=lambda r: (r["path"], r["reason"]))}
    if cfg.source.startswith("builtin"):
        stats["builtin"] = to_dict(cfg.builtin)
    write_meta(staging.built, classes, stats)
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
    """Build `cfg.out` from `cfg.source`, resuming a killed run of the same job; returns the stats."""
    out = Path(cfg.out).resolve()
    check_out(out)
    require_writable(out.parent, "out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with prepare_lock(out), data_lock(out, exclusive=True, key="out"):
        return _prepare(cfg, out, default_workers() if workers is None else workers)


def _prepare(cfg: PrepareConfig, out: Path, workers: int) -> dict[str, Any]:
    """`prepare` under the locks of `out`: no other prepare builds it and no training reads it."""
    start = time.perf_counter()
    generated = out.with_name(f".{out.name}.generated")
    if cfg.source.startswith("builtin"):
        reid = cfg.source == "builtin_reid"
        print(f"prepare {cfg.source}: generating {'persons' if reid else 'shapes'}", file=sys.stderr)
        shutil.rmtree(generated, ignore_errors=True)
        (builtin.write_persons if reid else builtin.write_shapes)(generated, cfg.builtin)
        root, scan = generated, SOURCES["market1501" if reid else "imagefolder"](generated)
    else:
        root = Path(cfg.root).absolute()
        classes = read_class_list(Path(cfg.classes)) if cfg.classes else None
        scan = scan_imagefolder(root, classes) if classes is not None else SOURCES[cfg.source](root)
    order = {s: i for i, s in enumerate(scan.splits)}
    items = sorted(scan.items, key=lambda it: (order[it.split], it.src))
    staging = Staging(out, _job(scan, root, items, cfg))
    stats = build(scan, root, staging, items, cfg, workers)
    _swap_in(staging.built, out)
    shutil.rmtree(staging.root, ignore_errors=True)
    shutil.rmtree(generated, ignore_errors=True)
    n = sum(c["images"] for c in stats["counts"].values())
    print(f"prepare {cfg.source}: {n} images in {len(stats['shards'])} shards, {len(stats['rejected'])} rejected, "
          f"{time.perf_counter() - start:.1f}s -> {out}", file=sys.stderr)
    return stats


def prepare_stage(params: Params, names: list[str]) -> None:
    """The DVC stage `prepare`: the active profile's datasets, or those named."""
    for name, cfg in profile_datasets(params, names).items():
        try:
            prepare(cfg)
        except ConfigError as err:
            raise err.under(f"datasets.{name}") from None


def run(args: argparse.Namespace) -> int:
    cfg = parse(PrepareConfig, {"source": args.source, "root": args.root, "classes": args.classes, "out": args.out,
                                "resize": args.resize, "max_side": args.max_side or None,
                                "shard_mb": args.shard_mb, "quality": args.quality,
                                "builtin": {"seed": args.seed}}, "prepare")
    if args.workers is not None and args.workers < 1:
        raise ConfigError("--workers", args.workers, "an integer >= 1")
    prepare(cfg, args.workers)
    return 0
