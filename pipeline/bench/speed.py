"""Table 10: frames/s of each baseline model and its NOAH counterpart (`python -m pipeline benchmark`).

GPU frames/s at batch 200 when CUDA is present and CPU frames/s on one core (`torch.set_num_threads(1)`)
at batch 1, 224×224 inputs, after warm-up. Baseline and NOAH are timed in turns (the one that goes first
alternates), so each round is a pair that drifting load hits alike. Each frames/s column is the median of
the rounds, with its spread ((max - min) / median, %). Overhead % = (vanilla FPS - NOAH FPS) / vanilla FPS
× 100, as pipeline/paper/README.md defines it, taken per round and averaged, with a Student-t 95% interval
(`{dev}_overhead_low`/`_high`). Rounds go on past the minimum until that interval is narrower than the
paper's overhead for the row (`{dev}_resolved`), or the round cap or time budget is reached (`{dev}_rounds`
says how many); a registered backbone Table 10 does not print is timed for the minimum rounds, `{dev}_resolved`
empty (no paper overhead to resolve). Every registered backbone is timed by default, Table 10's in its order
first. Results go to PREFIX.csv / PREFIX.json (atomically; the JSON also keeps every round's
overhead) and to one MLflow run of experiment `table10`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Metric, Param
from torch import nn

from ..config import BenchmarkConfig, ConfigError, parse
from ..models import build_model, list_backbones
from ..paper import read_paper_table
from ..training.tracking import MAX_BATCH, check_store, client, experiment_id, git_commit
from ..utils.io import atomic_write_text, csv_text, require_writable
from ..utils.machine import fixed_threads
from ..utils.progress import steps
from ..utils.stats import mean, t_interval
from .timing import rounds_in_turns

EXPERIMENT = "table10"
PAPER_COLUMNS = ["key", "vanilla_params_m", "vanilla_gpu_fps", "vanilla_cpu_fps", "noah_params_m", "noah_gpu_fps",
                 "noah_cpu_fps", "gpu_overhead_pct", "cpu_overhead_pct"]
SPREAD_COLUMNS = [f"{model}_{dev}_spread_pct" for dev in ("gpu", "cpu") for model in ("vanilla", "noah")]
INTERVAL_COLUMNS = [f"{dev}_{col}" for dev in ("gpu", "cpu")
                    for col in ("overhead_low", "overhead_high", "rounds", "resolved")]
COLUMNS = ["row", *PAPER_COLUMNS, *SPREAD_COLUMNS, *INTERVAL_COLUMNS]


def overhead_pct(vanilla_fps: float, noah_fps: float) -> float:
    """Table 10's overhead: the share of the baseline's frames/s that NOAH gives up, in %."""
    return (vanilla_fps - noah_fps) / vanilla_fps * 100


def paper_rows() -> dict[str, dict[str, str]]:
    """Table 10 as the paper prints it, by backbone key, in its row order."""
    return {row["key"]: row for row in read_paper_table("table10_speed.csv")}


def _fps(seconds: list[float], batch: int) -> tuple[float, float]:
    """Median frames/s and its spread in % of the median."""
    fps = [batch / s for s in seconds]
    median = statistics.median(fps)
    return median, (max(fps) - min(fps)) / median * 100


@dataclass(frozen=True)
class PairTiming:
    """One device's rounds of a baseline/NOAH pair. `overhead` is (mean, low, high) of the per-round
    overheads: the mean rather than the overhead of the median frames/s, so that the point and its
    interval describe the same quantity (the median's overhead can fall outside the interval)."""

    fps: dict[str, tuple[float, float]]  # model -> (median frames/s, spread %)
    overheads: list[float]  # per round, in %
    overhead: tuple[float, float, float]


def time_pair(pair: dict[str, nn.Module], device: str, batch: int, img_size: int, min_rounds: int,
              max_rounds: int, seconds: float, target_width: float, warmup: int) -> PairTiming:
    """Time `pair` ("vanilla" and "noah") in rounds on `device` (the CPU with one thread, restored after):
    at least `min_rounds` (>= 2, for an interval), then until the overhead's 95% interval is narrower than
    `target_width` or `max_rounds` rounds or `seconds` of wall time (warm-up included) are spent."""
    if min_rounds < 2:
        raise ValueError(f"min_rounds {min_rounds}: an interval needs at least two rounds")
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    models = {name: model.to(device) for name, model in pair.items()}
    walls: dict[str, list[float]] = {name: [] for name in models}
    overheads: list[float] = []
    started = time.perf_counter()
    try:
        with fixed_threads(1 if device == "cpu" else torch.get_num_threads()), torch.inference_mode():
            for timings in rounds_in_turns({name: (lambda m=m: m(x)) for name, m in models.items()}, warmup, sync):
                for name, t in timings.items():
                    walls[name].append(t.wall)
                overheads.append(overhead_pct(1 / timings["vanilla"].wall, 1 / timings["noah"].wall))
                if len(overheads) < min_rounds:
                    continue
                low, high = t_interval(overheads)
                if (high - low < target_width or len(overheads) >= max_rounds
                        or time.perf_counter() - started >= seconds):
                    break
    finally:
        for model in models.values():
            model.cpu()
        if device == "cuda":
            torch.cuda.empty_cache()
    return PairTiming({name: _fps(w, batch) for name, w in walls.items()}, overheads, (mean(overheads), low, high))


def benchmark_order() -> list[str]:
    """Every registered backbone: Table 10's in its row order, then those it does not print (registry order)."""
    printed = [k for k in paper_rows() if k in list_backbones()]
    return printed + [k for k in list_backbones() if k not in printed]


def benchmark_backbone(key: str, paper: dict[str, str] | None, cfg: BenchmarkConfig, use_gpu: bool) -> dict[str, Any]:
    """One Table 10 row for backbone `key`: Params (M) of both models, their frames/s on GPU (if used) and one
    CPU core, NOAH's overhead with its interval, timed until narrower than the paper's row `paper` (None: a
    backbone the paper does not time, timed for the minimum rounds, `{dev}_resolved` None)."""
    pair = {name: build_model(key, {"kind": kind}, 1000, cfg.img_size).eval()
            for name, kind in (("vanilla", "baseline"), ("noah", "noah"))}
    row: dict[str, Any] = {"key": key}
    for name, model in pair.items():
        row[f"{name}_params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    runs = [("cpu", cfg.cpu_batch, cfg.cpu_repeats, cfg.cpu_max_repeats, cfg.cpu_seconds, cfg.cpu_warmup)]
    if use_gpu:
        runs.insert(0, ("gpu", cfg.gpu_batch, cfg.gpu_repeats, cfg.gpu_max_repeats, cfg.gpu_seconds, cfg.gpu_warmup))
    for dev, batch, least, most, seconds, warmup in runs:
        target = abs(float(paper[f"{dev}_overhead_pct"])) if paper else math.inf
        timing = time_pair(pair, "cuda" if dev == "gpu" else "cpu", batch, cfg.img_size, least, most, seconds,
                           target, warmup)
        for name, (fps, spread) in timing.fps.items():
            row[f"{name}_{dev}_fps"], row[f"{name}_{dev}_spread_pct"] = round(fps, 2), round(spread, 2)
        mean, low, high = timing.overhead
        row |= {f"{dev}_overhead_pct": round(mean, 2), f"{dev}_overhead_low": round(low, 2),
                f"{dev}_overhead_high": round(high, 2), f"{dev}_rounds": len(timing.overheads),
                f"{dev}_resolved": high - low < target if paper else None,
                f"{dev}_round_overheads_pct": [round(o, 3) for o in timing.overheads]}
    return row


def _progress(row: dict[str, Any], dev: str, digits: int) -> str:
    """`dev`'s part of a progress line: both frames/s, the overhead with its interval, rounds, verdict."""
    return (f"{dev} {row[f'vanilla_{dev}_fps']:.{digits}f} vs {row[f'noah_{dev}_fps']:.{digits}f} fps "
            f"({row[f'{dev}_overhead_pct']:+.2f}% [{row[f'{dev}_overhead_low']:+.2f}, "
            f"{row[f'{dev}_overhead_high']:+.2f}], {row[f'{dev}_rounds']} rounds, "
            f"{_verdict(row[f'{dev}_resolved'])})")


def _verdict(resolved: bool | None) -> str:
    return "no paper overhead" if resolved is None else f"{'' if resolved else 'not '}narrower than the paper's"


def resolve_backbones(backbones: tuple[str, ...] | None) -> list[str]:
    """The backbones to time (None: every registered one) in `benchmark_order()`; unknown keys are a ConfigError
    before any work."""
    order = benchmark_order()
    if backbones is None:
        return order
    unknown = [k for k in backbones if k not in order]
    if unknown or not backbones:
        raise ConfigError("benchmark.backbones", unknown[0] if unknown else [], "registered backbones: "
                          + ", ".join(order))
    return sorted(dict.fromkeys(backbones), key=order.index)


def log_mlflow(tracking_uri: str, rows: list[dict[str, Any]], meta: dict[str, Any], files: list[Path]) -> str:
    """One run in experiment `table10`: the settings as params, every number as `<backbone>/<column>`."""
    mlflow_client = client(tracking_uri)
    run = mlflow_client.create_run(experiment_id(mlflow_client, EXPERIMENT), run_name="table10",
                                   tags={"mlflow.source.git.commit": str(meta["commit"])})
    params = [Param(k, str(v)) for k, v in meta.items() if k not in ("date", "load_after")]
    now = int(time.time() * 1000)
    metrics = [Metric(f"{row['key']}/{col}", float(row[col]), now, 0)
               for row in rows for col in COLUMNS[2:] if row.get(col) is not None]
    for start in range(0, max(len(params), len(metrics)), MAX_BATCH):
        mlflow_client.log_batch(run.info.run_id, metrics=metrics[start:start + MAX_BATCH],
                                params=params[start:start + MAX_BATCH])
    for path in files:
        mlflow_client.log_artifact(run.info.run_id, str(path))
    mlflow_client.set_terminated(run.info.run_id)
    return run.info.run_id


def run_benchmark(cfg: BenchmarkConfig, tracking_uri: str | None, use_gpu: bool | None = None) -> list[dict]:
    """Time every backbone pair, write PREFIX.csv/.json atomically, log the MLflow run; returns the rows."""
    keys = resolve_backbones(cfg.backbones)
    require_writable(Path(cfg.out).parent, "benchmark.out")
    if tracking_uri:
        check_store(tracking_uri, "mlflow.tracking_uri")
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    elif use_gpu and not torch.cuda.is_available():
        raise ConfigError("--gpu", "on", "'auto' or 'off' (CUDA is not available here)")
    paper = paper_rows()
    order = benchmark_order()
    meta: dict[str, Any] = {
        "backbones": ",".join(keys), **{k: v for k, v in asdict(cfg).items() if k not in ("backbones", "out")},
        "gpu": torch.cuda.get_device_name() if use_gpu else None, "cpu": platform.processor() or platform.machine(),
        "cpu_threads": 1, "torch": torch.__version__, "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_before": round(os.getloadavg()[0], 2)}
    rows = []
    started = time.perf_counter()
    step = steps(len(keys))
    for i, key in enumerate(keys, 1):
        row = {"row": order.index(key) + 1, **benchmark_backbone(key, paper.get(key), cfg, use_gpu)}
        rows.append(row)
        gpu = f", {_progress(row, 'gpu', 1)}" if use_gpu else ""
        step(i, f"{key}: {_progress(row, 'cpu', 2)}{gpu}  {time.perf_counter() - started:.0f}s")
    meta["load_after"] = round(os.getloadavg()[0], 2)
    meta["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(cfg.out)
    files = [out.with_suffix(".csv"), out.with_suffix(".json")]
    atomic_write_text(files[0], csv_text(rows, COLUMNS))
    atomic_write_text(files[1], json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    if tracking_uri:
        run_id = log_mlflow(tracking_uri, rows, meta, files)
        print(f"MLflow run {run_id} in experiment {EXPERIMENT!r} at {tracking_uri}")
    print(f"wrote {files[0]} and {files[1]} ({meta['seconds']}s, load {meta['load_before']} -> {meta['load_after']})")
    return rows


def config_from_args(args: argparse.Namespace) -> BenchmarkConfig:
    """The BenchmarkConfig the command-line options describe (validated like params.yaml)."""
    data = {f.name: getattr(args, f.name) for f in fields(BenchmarkConfig) if f.name != "backbones"}
    if args.backbones:
        data["backbones"] = [k.strip() for k in args.backbones.split(",") if k.strip()]
    return parse(BenchmarkConfig, data, "benchmark")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    run_benchmark(cfg, args.tracking_uri or None, {"auto": None, "on": True, "off": False}[args.gpu])
    return 0
