"""The prepared-folder format: the one module that reads and writes what `prepare` leaves behind.

A prepared folder holds `shards/<split>-NNNNN.tar` (the stored JPEGs, see shards.py), `manifest.csv` (one
row per image: `path` (the source file, relative to the source root), `label`, `split`, the class, the
source's SHA-256, original and stored sizes, and `shard,offset,size`: where its bytes are), `classes.json`,
`stats.json` (counts, mean/std, the task: `classification` or `reid`, rejected inputs) and `MARKER`, the
proof that prepare built it and may replace it.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError

MANIFEST = "manifest.csv"
CLASSES = "classes.json"
STATS = "stats.json"
MARKER = ".noah-prepared"
MARKER_TEXT = "Built by `python -m pipeline prepare`, which replaces this whole folder when it runs again.\n"


def is_prepared(data_dir: str | Path) -> bool:
    """Whether `data_dir` holds a prepared dataset's manifest (what a trial's identity hashes)."""
    return (Path(data_dir) / MANIFEST).is_file()


def require_prepared(data_dir: str | Path, names: tuple[str, ...] = (MANIFEST, CLASSES, STATS)) -> None:
    """A clear error, naming the missing files, when `data_dir` lacks some of a prepared folder's `names`."""
    missing = [n for n in names if not (Path(data_dir) / n).is_file()]
    if missing:
        raise ConfigError("data_dir", str(data_dir), f"a prepared dataset folder (missing {', '.join(missing)}; "
                          "build it with `python -m pipeline prepare`)")


def read_meta(data_dir: str | Path) -> tuple[list[str], dict[str, Any]]:
    """(classes, stats) of a prepared folder, without reading its manifest (one row per image)."""
    require_prepared(data_dir, (CLASSES, STATS))
    folder = Path(data_dir)
    return (json.loads((folder / CLASSES).read_text(encoding="utf-8")),
            json.loads((folder / STATS).read_text(encoding="utf-8")))


def read_dataset(data_dir: str | Path) -> tuple[list[dict[str, str]], list[str], dict[str, Any]]:
    """(manifest rows, classes, stats) of a prepared folder, with a clear error when it is not one."""
    require_prepared(data_dir)
    with open(Path(data_dir) / MANIFEST, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return rows, *read_meta(data_dir)


@dataclass(frozen=True)
class Split:
    """One split's images as arrays, in manifest order: an ImageNet manifest as 1.28M dicts would take
    gigabytes in every loader worker. `shard` indexes `shards`; `pid`/`camid` only for reid."""

    shards: tuple[str, ...]
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    width: np.ndarray
    height: np.ndarray
    label: np.ndarray
    pid: np.ndarray | None
    camid: np.ndarray | None

    def __len__(self) -> int:
        return len(self.label)


def read_split(data_dir: str | Path, split: str) -> Split:
    """The rows of `split` (one of stats.json's `splits`, with a clear error otherwise)."""
    require_prepared(data_dir)
    splits = read_meta(data_dir)[1]["splits"]
    if split not in splits:
        raise ConfigError("split", split, "one of " + ", ".join(map(repr, splits)))
    names: dict[str, int] = {}
    columns: dict[str, list[int]] = {k: [] for k in ("shard", "offset", "size", "width", "height", "label",
                                                     "pid", "camid")}
    with open(Path(data_dir) / MANIFEST, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        reid = "pid" in (reader.fieldnames or ())
        for row in reader:
            if row["split"] != split:
                continue
            columns["shard"].append(names.setdefault(row["shard"], len(names)))
            for key in ("offset", "size", "width", "height", "label"):
                columns[key].append(int(row[key]))
            if reid:
                columns["pid"].append(int(row["pid"]))
                columns["camid"].append(int(row["camid"]))
    arrays = {k: np.asarray(v, dtype=np.int64) for k, v in columns.items()}
    return Split(tuple(names), **{k: v for k, v in arrays.items() if k not in ("pid", "camid")},
                 pid=arrays["pid"] if reid else None, camid=arrays["camid"] if reid else None)


def check_shards(data_dir: str | Path) -> None:
    """Refuse a prepared folder whose shards are shorter than its manifest says (cut short by a copy or a full
    disk, or missing): one clear error before training, not a failed read mid-epoch. Sizes only, from one
    pass over the manifest: checking the stored bytes would cost an epoch of reading."""
    require_prepared(data_dir, (MANIFEST,))
    folder = Path(data_dir)
    ends: dict[str, int] = {}
    with open(folder / MANIFEST, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        shard, offset, length = (header.index(name) for name in ("shard", "offset", "size"))
        for row in reader:
            ends[row[shard]] = max(ends.get(row[shard], 0), int(row[offset]) + int(row[length]))
    for name, end in ends.items():
        size = (folder / name).stat().st_size if (folder / name).is_file() else None
        if size is None or size < end:
            found = "missing" if size is None else f"{size} bytes"
            raise ConfigError("data_dir", str(data_dir), f"a complete prepared dataset; {name} is {found}, its "
                              f"manifest needs at least {end} bytes (prepare the dataset again)")


def train_images(data_dir: str | Path) -> int | None:
    """Training images of a prepared folder (its stats.json count), or None before it is prepared."""
    stats = Path(data_dir) / STATS
    return json.loads(stats.read_text(encoding="utf-8"))["counts"]["train"]["images"] if stats.is_file() else None


def num_classes(data_dir: str | Path) -> int | None:
    """Classes (identities, for reid) of a prepared folder, or None before it is prepared."""
    path = Path(data_dir) / CLASSES
    return len(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def manifest_hash(data_dir: str | Path) -> str:
    """SHA-256 of a prepared dataset's manifest.csv and classes.json (the manifest holds every image's
    own SHA-256, so this changes whenever any image, label or split does)."""
    require_prepared(data_dir, (MANIFEST, CLASSES))
    files = [Path(data_dir) / name for name in (MANIFEST, CLASSES)]
    return _hash_files(tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files))


@functools.lru_cache(maxsize=64)
def _hash_files(files: tuple[tuple[str, int, int], ...]) -> str:
    """Hash of the files' bytes, cached by (path, mtime, size): a trial's identity, tags and config all
    ask for it, and an ImageNet manifest is large."""
    digest = hashlib.sha256()
    for path, _, _ in files:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def write_manifest(out: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """`manifest.csv` with `columns`, rows in the order given (prepare sorts them: byte-identical output)."""
    with open(out / MANIFEST, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([row[c] for c in columns] for row in rows)


def write_meta(out: Path, classes: list[str], stats: dict[str, Any]) -> None:
    """`classes.json`, `stats.json` and the marker: written last, so a folder with them is complete."""
    for name, data in ((CLASSES, classes), (STATS, stats)):
        (out / name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / MARKER).write_text(MARKER_TEXT, encoding="utf-8")


def is_replaceable(folder: Path) -> bool:
    """True for an empty folder or one that carries `MARKER`: the only existing folders prepare replaces."""
    return folder.is_dir() and ((folder / MARKER).is_file() or not any(folder.iterdir()))
