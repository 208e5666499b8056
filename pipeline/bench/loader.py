"""`python -m pipeline bench-loader`: the project's training loader against a plain torchvision one.

On the same images (ImageNet-like JPEGs generated in a temp folder and prepared with the 500-px cap, or
`--root` and `--data` folders), it times one full pass over the train split of:

- project: `build_loader(train=True)`: stored JPEGs read from shards, RandomResizedCrop + flip on uint8
  tensors in the workers, standardised per batch in the main process (no model);
- plain: `torchvision.datasets.ImageFolder` over the original JPEGs with RandomResizedCrop, flip, ToTensor
  and Normalize in a `DataLoader` (shuffled, the same workers);
- decode: one process reading every stored train image from its shard and decoding it with the project's
  decoder (no crop): what one core can get out of the stored format.

with one worker and with all of them. Each DataLoader is built once per setting with persistent workers
and warmed up by one untimed pass, so worker start-up is not timed; passes run in turns and the best of
`--repeats` counts.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from ..config import ConfigError, PrepareConfig
from ..data.loaders import build_loader, decode
from ..data.prepare import default_workers, prepare
from ..data.prepared import read_meta, read_split
from ..data.shards import ShardReader
from ..utils.progress import resolve_mode, steps
from .imagenet_like import describe, size_summary, write_imagenet_like
from .timing import timed_in_turns


@contextlib.contextmanager
def quietly() -> Iterator[None]:
    """Hold back what the body prints to stderr (prepare's progress lines) when stderr is not a terminal;
    shown after all if the body fails. On a terminal its progress bars stay."""
    if resolve_mode() != "line":
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def generate_and_prepare(src: Path, out: Path, n: int, workers: int) -> tuple[list[Path], float, float]:
    """`n` ImageNet-like JPEGs under `src`, prepared (500-px cap, default shards) into `out`; returns the
    paths and the seconds each step took."""
    start = time.perf_counter()
    paths = write_imagenet_like(src, n, workers=workers)
    generated = time.perf_counter()
    with quietly():
        prepare(PrepareConfig(source="imagefolder", root=str(src), out=str(out), max_side=500), workers=workers)
    return paths, generated - start, time.perf_counter() - generated


def count_pass(loader: object) -> int:
    """Consume one pass of a loader; how many images it yielded."""
    n = 0
    for images, *_ in loader:  # type: ignore[attr-defined]
        n += len(images)
    return n


def decode_pass(data_dir: Path, split: str = "train") -> int:
    """Read and decode every stored image of `split` in this process (no crop); how many."""
    ix, reader = read_split(data_dir, split), ShardReader(data_dir)
    for shard, offset, size in zip(ix.shard.tolist(), ix.offset.tolist(), ix.size.tolist()):
        decode(reader.read(ix.shards[shard], offset, size))
    return len(ix)


def plain_loader(src: Path, data_dir: Path, img_size: int, batch: int, workers: int) -> DataLoader:
    """What one writes without the pipeline: torchvision's ImageFolder and transforms on the originals."""
    stats = read_meta(data_dir)[1]
    transform = T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(stats["mean"], stats["std"])])
    return DataLoader(datasets.ImageFolder(str(src / "train"), transform), batch_size=batch, shuffle=True,
                      num_workers=workers, persistent_workers=workers > 0)


def measure_setting(src: Path, data_dir: Path, img_size: int, batch: int, workers: int, repeats: int,
                    with_decode: bool) -> dict[str, float]:
    """img/s of project and plain with `workers` workers (and of the decode loop), best of `repeats`. The
    loaders, and their persistent workers, end with this call."""
    project = build_loader(data_dir, "train", img_size, batch, train=True, workers=workers)
    plain = plain_loader(src, data_dir, img_size, batch, workers)
    counts: dict[str, int] = {}

    def project_pass() -> None:
        project.set_epoch(0)
        counts["project"] = count_pass(project)

    def plain_pass() -> None:
        counts["plain"] = count_pass(plain)

    def bare_decode() -> None:
        counts["decode"] = decode_pass(data_dir)

    methods: dict[str, Callable[[], None]] = {"project": project_pass, "plain": plain_pass}
    if with_decode:
        methods["decode"] = bare_decode
    times = timed_in_turns(methods, repeats, warmup=1)
    return {name: counts[name] / min(t.wall for t in ts) for name, ts in times.items()}


def measure(src: Path, data_dir: Path, img_size: int, batch: int, settings: list[int], repeats: int,
            step: Callable[[int, str], None]) -> dict[str, float]:
    """img/s of every method (`project<w>`, `plain<w>` for each worker count, `decode`), best of repeats."""
    rates: dict[str, float] = {}
    for k, workers in enumerate(settings):
        got = measure_setting(src, data_dir, img_size, batch, workers, repeats, with_decode=k == 0)
        rates |= {name if name == "decode" else f"{name}{workers}": rate for name, rate in got.items()}
        step(k + 3, f"{workers} worker{'s' if workers > 1 else ''}: project {got['project']:.0f} img/s, "
             f"plain {got['plain']:.0f} img/s")
    return rates


def table(rates: dict[str, float], settings: list[int]) -> str:
    lines = [f"{'workers':>7} {'project img/s':>14} {'per worker':>11} {'plain img/s':>12} {'per worker':>11} "
             f"{'project/plain':>14}"]
    for w in settings:
        p, q = rates[f"project{w}"], rates[f"plain{w}"]
        lines.append(f"{w:>7} {p:>14.0f} {p / w:>11.0f} {q:>12.0f} {q / w:>11.0f} {p / q:>13.2f}x")
    lines.append(f"decode loop (1 process, stored JPEGs, no crop): {rates['decode']:.0f} img/s; "
                 f"project (1 worker) / decode: {rates[f'project{settings[0]}'] / rates['decode']:.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if (args.root is None) != (args.data is None):
        raise ConfigError("--root/--data", (args.root, args.data), "both (existing source and prepared folders) "
                          "or neither (generated data)")
    if args.root is None and args.images < 10:
        raise ConfigError("--images", args.images, "an integer >= 10")
    for name in ("img_size", "batch", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}", getattr(args, name), "an integer >= 1")
    workers = args.workers or default_workers()
    if workers < 1:
        raise ConfigError("--workers", args.workers, "an integer >= 1")
    settings = sorted({1, workers})
    step = steps(2 + len(settings), "bench-loader")
    torch.manual_seed(0)  # the plain loader shuffles and crops from the global generator
    torch.set_num_threads(1)  # this process only collects batches: more compute threads would fight the workers
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        if args.root is None:
            src, data_dir = Path(tmp) / "src", Path(tmp) / "prepared"
            paths, gen_s, prep_s = generate_and_prepare(src, data_dir, args.images, default_workers())
            step(1, f"generated {args.images} ImageNet-like JPEGs in {gen_s:.1f}s")
            step(2, f"prepared in {prep_s:.1f}s")
        else:
            src, data_dir = Path(args.root), Path(args.data)
            paths = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
            step(2, f"using {src} and {data_dir}")
        split = read_split(data_dir, "train")
        stored_long = float(np.maximum(split.width, split.height).mean()) if len(split) else 0.0
        print(f"source: {describe(size_summary(paths))}; prepared train split: {len(split)} images, mean long "
              f"side {stored_long:.0f} px, {split.size.sum() / 1e6:.1f} MB")
        rates = measure(src, data_dir, args.img_size, args.batch, settings, args.repeats, step)
    print(f"img_size {args.img_size}, batch {args.batch}, one pass over the train split, best of {args.repeats} "
          f"(after a warm-up pass)")
    print(table(rates, settings), flush=True)
    return 0
