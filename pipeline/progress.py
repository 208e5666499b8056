"""Progress of long work: a tqdm bar on a terminal, plain lines otherwise (DVC and CI logs stay readable)."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Iterator


def progress(items: Iterable[Any], total: int, desc: str) -> Iterator[Any]:
    """`items` passed through, with a bar or one line per tenth of the work and the rate so far."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit="img")
        return
    step, start = max(1, total // 10), time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        if i % step == 0 or i == total:
            rate = i / max(time.perf_counter() - start, 1e-9)
            print(f"{desc}: {i}/{total} ({rate:.0f} img/s)", file=sys.stderr, flush=True)


def steps(total: int) -> Callable[[int, str], None]:
    """A `step(i, text)` to call after each of `total` steps: the bar shows `text`, a line is `[i/total] text`."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, file=sys.stderr)

        def step(i: int, text: str) -> None:
            bar.set_postfix_str(text, refresh=False)
            bar.update(1)
            if i == total:
                bar.close()
        return step
    return lambda i, text: print(f"[{i}/{total}] {text}", file=sys.stderr, flush=True)
