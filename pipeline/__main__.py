"""`python -m pipeline COMMAND …`: a command is a module with `add_arguments(parser)` and `run(args)`,
imported only when used (so `prepare` does not pay for torch, nor `plan` for Ray)."""
from __future__ import annotations

import argparse
import importlib
import sys

from .config import ConfigError

COMMANDS: dict[str, tuple[str, str]] = {
    "complexity": ("pipeline.models.complexity", "Params and MAdds of backbones and heads at ImageNet settings"),
    "prepare": ("pipeline.data.prepare", "Build a prepared dataset (manifest, classes, stats)"),
    "plan": ("pipeline.study.plan", "Count the trials of every table and estimate their compute"),
    "train": ("pipeline.training.cli", "Train and evaluate one trial"),
    "clean": ("pipeline.study.clean", "Remove checkpoints no resume or later stage needs (--dry-run: list)"),
    "report": ("pipeline.report", "Tables 1-11 beside the paper's numbers, figures and an index"),
    "benchmark": ("pipeline.bench.speed", "Table 10: frames/s of baseline vs NOAH models"),
    "bench-head": ("pipeline.bench.head", "Head latency, train step and saved memory: ours vs straightforward"),
    "bench-prepare": ("pipeline.bench.prepare", "Prepare throughput vs a one-process PIL loop"),
    "bench-train": ("pipeline.bench.train", "Trainer images/s vs a bare PyTorch loop"),
    "bench-loader": ("pipeline.bench.loader", "Training loader images/s vs torchvision ImageFolder, decode ceiling"),
    "rehearse": ("pipeline.bench.rehearse", "Scale rehearsal: generate, prepare, check, DVC-track, read an epoch"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        lines = [f"  {name:<14}{help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: python -m pipeline COMMAND [options]\n\ncommands:\n" + "\n".join(lines), file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module_name, help_ = COMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"python -m pipeline {argv[0]}", description=help_)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return module.run(args) or 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
