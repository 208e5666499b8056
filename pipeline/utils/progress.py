"""Progress of long work, the one mechanism every command uses: a tqdm bar on a terminal, plain lines
otherwise (DVC and CI logs stay readable), nothing with mode `off`."""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm import tqdm

MODES = ("auto", "bar", "line", "off")


def resolve_mode(mode: str = "auto") -> str:
    """`auto` is `bar` when stderr is a terminal, else `line`; `bar`, `line` and `off` stay as given."""
    return ("bar" if sys.stderr.isatty() else "line") if mode == "auto" else mode


def progress(items: Iterable[Any], total: int, desc: str, unit: str = "img", mode: str = "auto") -> Iterator[Any]:
    """`items` passed through, with a bar or one line per tenth of the work and the rate so far."""
    mode = resolve_mode(mode)
    if mode == "bar":
        yield from tqdm(items, total=total, desc=desc, unit=unit)
        return
    step, start = max(1, total // 10), time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        if mode == "line" and (i % step == 0 or i == total):
            rate = i / max(time.perf_counter() - start, 1e-9)
            print(f"{desc}: {i}/{total} ({rate:.0f} {unit}/s)", file=sys.stderr, flush=True)


def steps(total: int, desc: str = "", mode: str = "auto") -> Callable[[int, str], None]:
    """A `step(i, text)` to call when step `i` of `total` is done: the bar shows `text`, a line is
    `desc i/total: text` (`[i/total] text` without `desc`)."""
    mode = resolve_mode(mode)
    if mode == "off":
        return lambda i, text: None
    if mode == "line":
        head = (lambda i: f"{desc} {i}/{total}:") if desc else (lambda i: f"[{i}/{total}]")
        return lambda i, text: print(f"{head(i)} {text}", file=sys.stderr, flush=True)
    bar = tqdm(total=total, desc=desc or None, file=sys.stderr)

    def step(i: int, text: str) -> None:
        bar.set_postfix_str(text, refresh=False)
        bar.update(i - bar.n)
        if i == total:
            bar.close()
    return step


@contextlib.contextmanager
def ticker(total: int, desc: str, mode: str = "auto") -> Iterator[Callable[[], None] | None]:
    """A transient bar of `total` ticks (e.g. the batches of one epoch) in bar mode, else None: a line per
    batch would flood a log, so lines come from `steps` once the unit of work is done."""
    if resolve_mode(mode) != "bar":
        yield None
        return
    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    try:
        yield lambda: bar.update(1)
    finally:
        bar.close()
