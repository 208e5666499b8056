"""`python -m pipeline rehearse`: the scale rehearsal of the data path, on generated ImageNet-like images.

Steps, one line each with its time: generate `--images` JPEGs (imagenet_like.py) → `prepare` them (500-px
cap, default shards) → check the prepared folder (at most `--max-files` files; the manifest holds every
image not rejected, with labels that match the source class folders) → track it with DVC in a scratch
git + DVC repository (the project's cache link types), check that `dvc status` answers within
`STATUS_LIMIT_S` and that the cache holds no second copy of the shards (each is a hard link to, or a
symlink into, the cache) → read one epoch of the train split through `build_loader` (all images, in
order: the evaluation geometry at 224 px, batch 64) and check that every image came back with its label.

Exit code 1 with a one-line reason when a check fails. The work folder (`--out`, new or empty, or a temp
folder) is deleted at the end unless `--keep`.
"""
from __future__ import annotations

import argparse
import configparser
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..config import ConfigError
from ..data.loaders import build_loader
from ..data.prepare import default_workers
from ..data.prepared import read_dataset, read_split
from .loader import generate_and_prepare

REPO = Path(__file__).resolve().parents[2]  # the project's repository (its .dvc/config names the link types)
DEFAULT_CACHE_TYPE = "hardlink,symlink"
STATUS_LIMIT_S = 5.0
FICLONE = 0x40049409  # Linux ioctl: make a file share another's blocks (a reflink)


class CheckFailed(Exception):
    """A rehearsal check failed; the message is the one-line reason."""


def cache_type(config: Path = REPO / ".dvc" / "config") -> str:
    """`cache.type` of the project's DVC config, or `DEFAULT_CACHE_TYPE` when it sets none."""
    parser = configparser.ConfigParser()
    if config.is_file():
        parser.read(config, encoding="utf-8")
    return parser.get("cache", "type", fallback=DEFAULT_CACHE_TYPE).strip()


def tool(name: str) -> str:
    """The venv's copy of a command line tool (dvc) when there is one, else the one on PATH."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.is_file() else name


def sh(*cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    try:
        return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, env=env)
    except subprocess.CalledProcessError as err:
        last = (err.stderr or err.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise CheckFailed(f"`{' '.join(cmd[:3])}` failed (exit {err.returncode}): {last[0]}") from None
    except FileNotFoundError:
        raise CheckFailed(f"`{cmd[0]}` is not installed (rehearse needs git and dvc)") from None


def check_prepared(data_dir: Path, src: Path, n: int, max_files: int) -> str:
    """Files, manifest rows and labels of the prepared folder against its generated source."""
    files = sum(1 for p in data_dir.rglob("*") if p.is_file())
    if files > max_files:
        raise CheckFailed(f"the prepared folder holds {files} files, more than --max-files {max_files}")
    rows, classes, stats = read_dataset(data_dir)
    expected = n - len(stats["rejected"])
    if len(rows) != expected:
        raise CheckFailed(f"manifest has {len(rows)} rows, expected {expected} ({n} images, "
                          f"{len(stats['rejected'])} rejected)")
    folders = sorted(p.name for p in (src / "train").iterdir() if p.is_dir())
    if classes != folders:
        raise CheckFailed(f"classes.json {classes[:5]}… is not the sorted train class folders {folders[:5]}…")
    index = {c: i for i, c in enumerate(classes)}
    for row in rows:
        split, folder = Path(row["path"]).parts[:2]
        if (split, folder) != (row["split"], row["class"]) or int(row["label"]) != index.get(row["class"], -1):
            raise CheckFailed(f"manifest row {row['path']}: split {row['split']}, class {row['class']}, label "
                              f"{row['label']} do not match its folder (label {index.get(folder, -1)})")
    return (f"{files} files ({len(stats['shards'])} shards), {len(rows)} manifest rows, "
            f"{len(stats['rejected'])} rejected, labels match {len(classes)} class folders")


def can_reflink(folder: Path) -> bool:
    """Whether `folder`'s file system makes reflinks (copies that share blocks: XFS, btrfs)."""
    src, dst = folder / ".reflink-probe-src", folder / ".reflink-probe-dst"
    try:
        src.write_bytes(b"probe" * 1000)
        with open(src, "rb") as a, open(dst, "wb") as b:
            fcntl.ioctl(b.fileno(), FICLONE, a.fileno())
        return True
    except OSError:
        return False
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


def track_with_dvc(repo: Path, data_dir: Path, kind: str) -> float:
    """git + DVC scratch repository at `repo` (which holds `data_dir`) with cache links `kind`; `dvc add`
    the prepared folder; returns how long `dvc status` took."""
    git, dvc = tool("git"), tool("dvc")
    sh(git, "init", "-q", cwd=repo)
    sh(dvc, "init", "-q", cwd=repo)
    sh(dvc, "config", "cache.type", kind, cwd=repo)
    sh(dvc, "config", "core.analytics", "false", cwd=repo)
    sh(dvc, "add", "-q", data_dir.relative_to(repo).as_posix(), cwd=repo)
    start = time.perf_counter()
    status = sh(dvc, "status", cwd=repo)
    seconds = time.perf_counter() - start
    if seconds >= STATUS_LIMIT_S:
        raise CheckFailed(f"`dvc status` took {seconds:.1f}s (limit {STATUS_LIMIT_S:.0f}s)")
    if "up to date" not in status.stdout:
        raise CheckFailed(f"`dvc status` reports changes right after `dvc add`: {status.stdout.strip()[:200]}")
    return seconds


def check_cache(repo: Path, data_dir: Path, kind: str) -> str:
    """Every shard in the workspace is the cache's own file (hard link or symlink into it; on a file
    system that reflinks, with `reflink` in `kind`, a reflinked copy, which shares its blocks but cannot be
    told from a copy by its inode); returns a summary with the bytes the cache holds that no workspace file
    shares."""
    cache = (repo / ".dvc" / "cache").resolve()
    cached = {}
    for path in cache.rglob("*"):
        if path.is_file() and not path.is_symlink():
            st = path.stat()
            cached[(st.st_dev, st.st_ino)] = st.st_size
    shared: set[tuple[int, int]] = set()
    shards = sorted((data_dir / "shards").glob("*.tar"))
    reflinks = "reflink" in kind.split(",") and can_reflink(cache)
    for path in shards:
        if path.is_symlink():
            target = path.resolve()
            if cache not in target.parents:
                raise CheckFailed(f"{path.name} is a symlink outside the DVC cache ({target})")
            st = target.stat()
        else:
            st = path.stat()
            if (st.st_nlink < 2 or (st.st_dev, st.st_ino) not in cached) and not reflinks:
                raise CheckFailed(
                    f"{path.name} is a separate copy of its cache file ({st.st_nlink} link, no reflink): with "
                    f"cache.type {kind} the DVC cache doubles the data (DVC hard-links the workspace on add/commit "
                    "only when hardlink comes first)")
        shared.add((st.st_dev, st.st_ino))
    for path in data_dir.rglob("*"):  # the small files may be links too
        if path.is_file():
            st = path.stat()
            shared.add((st.st_dev, st.st_ino))
    unshared = sum(size for key, size in cached.items() if key not in shared)
    total = sum(cached.values())
    how = "reflinked to (or linked into)" if reflinks else "linked into"
    return (f"{len(shards)} shards {how} the cache, {total / 1e6:.1f} MB in cache of which "
            f"{unshared if not reflinks else 'n/a'} bytes not shared with the workspace")


def read_epoch(data_dir: Path, workers: int) -> tuple[int, float]:
    """One in-order pass over the train split (224 px, batch 64); checks count and labels."""
    split = read_split(data_dir, "train")
    loader = build_loader(data_dir, "train", 224, 64, train=False, workers=workers)
    start, labels = time.perf_counter(), []
    for _, y in loader:
        labels.append(y.numpy())
    seconds = time.perf_counter() - start
    got = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    if len(got) != len(split):
        raise CheckFailed(f"the epoch read {len(got)} images, the train split has {len(split)}")
    if not np.array_equal(got, split.label):
        raise CheckFailed("the epoch's labels differ from the manifest's")
    return len(got), seconds


def rehearse(work: Path, n: int, workers: int, max_files: int, kind: str, say: Callable[[str], None]) -> None:
    src, repo = work / "src", work / "repo"
    data_dir = repo / "data" / "prepared"
    repo.mkdir(parents=True)
    start = time.perf_counter()
    paths, gen_s, prep_s = generate_and_prepare(src, data_dir, n, workers)
    mb = sum(p.stat().st_size for p in paths) / 1e6
    say(f"generate: {n} ImageNet-like JPEGs, {mb:.0f} MB, {gen_s:.1f}s")
    stored = json.loads((data_dir / "stats.json").read_text(encoding="utf-8"))
    size = sum(p.stat().st_size for p in (data_dir / "shards").glob("*.tar")) / 1e6
    say(f"prepare: {len(stored['shards'])} shards, {size:.0f} MB, {prep_s:.1f}s ({n / max(prep_s, 1e-9):.0f} img/s)")
    t = time.perf_counter()
    summary = check_prepared(data_dir, src, n, max_files)
    say(f"check: {summary}, {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    status_s = track_with_dvc(repo, data_dir, kind)
    added = time.perf_counter() - t - status_s
    say(f"dvc: add {added:.1f}s (cache.type {kind}), status {status_s:.2f}s (limit {STATUS_LIMIT_S:.0f}s); "
        f"{check_cache(repo, data_dir, kind)}")
    images, seconds = read_epoch(data_dir, workers)
    say(f"read: one epoch of the train split, {images} images = the split's size, labels in order, "
        f"{images / seconds:.0f} img/s with {workers} workers, {seconds:.1f}s")
    say(f"all checks passed in {time.perf_counter() - start:.0f}s")


def run(args: argparse.Namespace) -> int:
    if args.images < 10:
        raise ConfigError("--images", args.images, "an integer >= 10")
    workers = default_workers() if args.workers is None else args.workers
    if workers < 1:
        raise ConfigError("--workers", args.workers, "an integer >= 1")
    if args.out is not None:
        work = Path(args.out)
        if work.exists() and (not work.is_dir() or any(work.iterdir())):
            raise ConfigError("--out", args.out, "a new or empty folder (rehearse deletes it at the end unless "
                              "--keep)")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="rehearse-"))

    def say(text: str) -> None:
        print(f"rehearse: {text}", flush=True)

    try:
        rehearse(work.resolve(), args.images, workers, args.max_files, args.cache_type or cache_type(), say)
    except CheckFailed as err:
        print(f"rehearse: FAILED: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0
