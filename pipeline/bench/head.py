"""`python -m pipeline bench-head`: the NOAH head against a straightforward one and a same-MAdds matmul.

For the head shapes of ResNet18, ResNet50, MobileNetV2 (0.5×) and DeiT-Tiny it prints, in one run,
head-only inference latency (ours, straightforward grouped convolutions, one dense matmul with the same
multiply-adds) at batch 1 and a larger batch, and the train-step time (forward + backward) and the bytes
saved for backward of ours and the straightforward head; on CUDA also each train step's peak memory
(`torch.cuda.max_memory_allocated` above what was allocated before it). Contenders are timed in turns;
medians shown.
"""
from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch import nn

from ..config import ConfigError, HeadConfig
from ..models import NoahHead
from .timing import timed_in_turns, walls

# name: (channels, height, width, N, r), the paper's NOAH settings on these backbones
SHAPES: dict[str, tuple[int, int, int, int, float]] = {
    "resnet18": (512, 7, 7, 4, 1 / 2),
    "resnet50": (2048, 7, 7, 4, 1 / 8),
    "mobilenetv2_050": (1280, 7, 7, 8, 1 / 4),
    "deit_tiny_100": (192, 14, 14, 4, 1 / 2),
}


class StraightforwardHead(nn.Module):
    """NOAH written the obvious way: grouped 1×1 convolutions, spatial softmax, product, sum."""

    def __init__(self, noah: NoahHead):
        super().__init__()
        n, m = noah.cfg.N, noah.num_classes
        self.n, self.key_channels = n, noah.key_channels
        self.key = nn.Conv2d(n * noah.key_channels, n * m, 1, groups=n)
        self.value = nn.Conv2d(n * noah.value_channels, n * m, 1, groups=n)
        with torch.no_grad():
            self.key.weight.copy_(noah.key_weight.reshape_as(self.key.weight))
            self.key.bias.copy_(noah.key_bias.flatten())
            self.value.weight.copy_(noah.value_weight.reshape_as(self.value.weight))
            self.value.bias.copy_(noah.value_bias.flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        groups = x.view(b, self.n, c // self.n, h, w)
        key_in = groups[:, :, : self.key_channels].reshape(b, -1, h, w)
        value_in = groups[:, :, self.key_channels:].reshape(b, -1, h, w)
        attn = self.key(key_in).flatten(2).view(b, self.n, -1, h * w).softmax(-1)
        value = self.value(value_in).view(b, self.n, -1, h * w)
        return (attn * value).sum(dim=(1, 3))


def saved_bytes(fn: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn` runs (parameters excluded)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak CUDA memory `fn` allocates on `device` beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each contender, timed in turns."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    return {name: statistics.median(t) for name, t in walls(timed_in_turns(contenders, repeats, warmup, sync)).items()}


def bench_shape(name: str, batches: tuple[int, ...], repeats: int, num_classes: int, device: str) -> list[dict]:
    """Inference rows (one per batch) and one train row (largest batch) for one backbone's head shape."""
    c, h, w, n, r = SHAPES[name]
    ours = NoahHead(HeadConfig(N=n, r=r), c, num_classes).to(device)
    plain = StraightforwardHead(ours).to(device)
    rows = []
    for b in batches:
        x = torch.randn(b, c, h, w, device=device)
        a, wt = torch.randn(b * h * w, c, device=device), torch.randn(c, num_classes, device=device)
        with torch.inference_mode():
            t = interleaved({"ours": lambda: ours(x), "plain": lambda: plain(x), "matmul": lambda: a @ wt}, repeats)
        rows.append({"shape": name, "batch": b, "mode": "inference", **t})
    b = max(batches)
    x = torch.randn(b, c, h, w, device=device, requires_grad=True)
    grad = torch.randn(b, num_classes, device=device)

    def step(head: nn.Module) -> Callable[[], None]:
        def run() -> None:
            head.zero_grad(set_to_none=True)
            head(x).backward(grad)
        return run

    t = interleaved({"ours": step(ours), "plain": step(plain)}, repeats)
    heads = {"ours": ours, "plain": plain}
    memory = {f"{k}_saved": saved_bytes(lambda: head(x), list(head.parameters())) for k, head in heads.items()}
    if x.is_cuda:
        memory |= {f"{k}_peak": peak_bytes(step(head), x.device) for k, head in heads.items()}
    rows.append({"shape": name, "batch": b, "mode": "train", **t, **memory, "input_bytes": x.nbytes})
    return rows


def format_rows(rows: list[dict]) -> str:
    """The side-by-side table: times in ms, ratios ours/other, saved bytes in MiB."""
    lines = [f"{'shape':<16}{'batch':>6} {'mode':<10}{'ours ms':>9}{'plain ms':>10}{'matmul ms':>10}"
             f"{'ours/plain':>11}{'ours/matmul':>12}{'saved ours MiB':>15}{'saved plain MiB':>16}{'ratio':>7}"
             f"{'peak ours MiB':>14}{'peak plain MiB':>15}{'ratio':>7}"]
    for row in rows:
        def ms(key: str) -> str:
            return f"{row[key] * 1e3:.3f}" if key in row else "-"

        ratio_mm = f"{row['ours'] / row['matmul']:.2f}" if "matmul" in row else "-"
        mem = ""
        for kind, width in (("saved", 15), ("peak", 14)):
            if f"ours_{kind}" in row:
                mib = [f"{row[f'{k}_{kind}'] / 2**20:.2f}" for k in ("ours", "plain")]
                mem += f"{mib[0]:>{width}}{mib[1]:>{width + 1}}{row[f'ours_{kind}'] / row[f'plain_{kind}']:>7.3f}"
            else:
                mem += f"{'-':>{width}}{'-':>{width + 1}}{'-':>7}"
        lines.append(f"{row['shape']:<16}{row['batch']:>6} {row['mode']:<10}{ms('ours'):>9}{ms('plain'):>10}"
                     f"{ms('matmul'):>10}{row['ours'] / row['plain']:>11.2f}{ratio_mm:>12}{mem}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()] if args.shapes else list(SHAPES)
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ConfigError("--shapes", unknown[0], "one of " + ", ".join(SHAPES))
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        raise ConfigError("--batches", args.batches, "comma-separated positive integers, e.g. 1,64") from None
    if not batches or min(batches) < 1:
        raise ConfigError("--batches", args.batches, "comma-separated positive integers, e.g. 1,64")
    if args.repeats < 1:
        raise ConfigError("--repeats", args.repeats, "an integer >= 1")
    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"classes={args.classes} repeats={args.repeats} (median seconds per call, contenders in turns)",
          flush=True)
    rows = []
    for name in shapes:
        rows += bench_shape(name, batches, args.repeats, args.classes, device)
        print(f"done {name}", flush=True)
    print(format_rows(rows))
    return 0
