"""The command line's options, apart from the commands' code: `python -m pipeline [COMMAND] --help` reads only
this module, so help answers in a blink instead of after importing torch, timm, Ray and MLflow (seconds).

A command is a `Command`: the module whose `run(args)` does the work (imported only when it runs) and the
function that declares its options here. Defaults come from `config`'s schema, which imports no torch;
tests/test_cli.py holds this module to that.
"""
from __future__ import annotations

import argparse
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import BenchmarkConfig, Decode, MlflowConfig, PrepareConfig
from .data.prepared import MARKER


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (None, a flag's False) or the help already
    says what it is (a default computed when the command runs, e.g. "all cores")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def complexity_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="CSV file to write")
    parser.add_argument("--backbones", default=None,
                        help="comma-separated backbone keys (default: every registered backbone)")
    parser.add_argument("--head", default=None,
                        help="one head for every backbone, e.g. kind=noah,N=4,r=0.5 (default: baseline, the "
                             "paper's noah and gap where the paper has one)")


def prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="where the images come from (PrepareConfig.source)")
    parser.add_argument("--root", help="source folder (imagefolder, market1501)")
    parser.add_argument("--classes", help="imagefolder: a class list file (one WordNet id or folder name a line, # "
                        "comments): only those classes, labelled 0..K-1 in its order (default: every class folder)")
    parser.add_argument("--out", required=True, help=f"output folder: new, empty or built by prepare (holds {MARKER}); "
                        "replaced atomically")
    parser.add_argument("--resize", type=int, default=PrepareConfig.resize,
                        help="scale the short side to this many pixels (default: keep it)")
    parser.add_argument("--max-side", type=int, default=PrepareConfig.max_side,
                        help="shrink the long side to at most this many pixels (default: %(default)s; 0: no cap)")
    parser.add_argument("--shard-mb", type=int, default=PrepareConfig.shard_mb, help="megabytes per shard file")
    parser.add_argument("--quality", type=int, default=PrepareConfig.quality, help="JPEG quality of the copies")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in datasets")
    parser.add_argument("--workers", type=int, default=None, help="decode processes (default: all cores)")


def plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", help="a key of params.yaml `profiles` (default: its `profile`)")
    parser.add_argument("--params", default=None, help="the params file (default: the repository's params.yaml)")
    parser.add_argument("--gpus", type=float, default=1, help="GPUs of the cluster")
    parser.add_argument("--gpus-per-trial", type=float, default=1,
                        help="GPUs each trial trains on (a fraction shares a GPU)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, help="a registered backbone key, e.g. resnet18")
    parser.add_argument("--head", default="kind=noah", help="head options, e.g. kind=noah,N=4,r=0.5")
    parser.add_argument("--recipe", default="resnet", help="a recipe name of params.yaml `recipes:`")
    parser.add_argument("--data", required=True, help="a prepared dataset folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation, augmentation and order")
    parser.add_argument("--img-size", type=int, default=224, help="training and evaluation resolution")
    parser.add_argument("--width", type=float, default=1.0, help="the backbone's channels times this (ResNets)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (lr scales with it)")
    parser.add_argument("--experiment", default="train", help="MLflow experiment name")
    parser.add_argument("--params", default=None,
                        help="read `recipes`, `mlflow` and `train` from this file (default: the repository's)")
    parser.add_argument("--tracking-uri", default=None, help="default: params.yaml mlflow.tracking_uri")
    parser.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (1: in this process)")
    parser.add_argument("--gpu", choices=("auto", "yes", "no"), default=None,
                        help="train on a GPU (default: params.yaml train.use_gpu)")
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="decoding processes (default: params.yaml train.loader_workers; null there: CPUs - 1)")
    parser.add_argument("--compile", choices=("auto", "yes", "no"), default=None,
                        help="torch.compile the model; auto: on a GPU (default: params.yaml train.compile)")
    parser.add_argument("--decode", choices=typing.get_args(Decode), default=None,
                        help="where JPEGs are decoded (default: params.yaml train.decode)")
    parser.add_argument("--checkpoint-dir", default=None, help="default: checkpoints/<trial_id>")
    parser.add_argument("--log-weights", action="store_true", help="store the final weights in MLflow")
    parser.add_argument("--retrain", action="store_true", help="train even if a FINISHED run exists")


def clean_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=None, help="the params file (default: the repository's params.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")


def migrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", default=MlflowConfig.tracking_uri, help="the store to copy")
    parser.add_argument("--to", dest="target", required=True, help="the store to copy into, e.g. http://HOST:5000")


def report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=Path("results"),
                        help="folder of <table>.json (its study/ subfolder's first)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="folder the reports are written to")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store with the runs' per-epoch metrics and weights (default: the results' meta)")
    parser.add_argument("--data", type=Path, default=None,
                        help="prepared dataset for the attention-map images (default: the run's own)")
    parser.add_argument("--checkpoints", default=None,
                        help="the trainer's checkpoint root: weights for the attention maps when a run logged none")


def benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchmarkConfig()
    parser.add_argument("--backbones", default=None, help="comma-separated backbone keys (default: every "
                        "registered backbone, Table 10's first in its order)")
    for dev, where in (("cpu", "on one CPU core"), ("gpu", "on the GPU")):
        parser.add_argument(f"--{dev}-repeats", type=int, default=getattr(d, f"{dev}_repeats"),
                            help=f"fewest timed rounds {where}")
        parser.add_argument(f"--{dev}-max-repeats", type=int, default=getattr(d, f"{dev}_max_repeats"),
                            help=f"most timed rounds {where}, if the overhead's interval stays wider than the paper's")
        parser.add_argument(f"--{dev}-seconds", type=float, default=getattr(d, f"{dev}_seconds"),
                            help=f"wall seconds per pair {where} after which no round starts (past the fewest)")
        parser.add_argument(f"--{dev}-warmup", type=int, default=getattr(d, f"{dev}_warmup"),
                            help=f"untimed rounds {where} first")
    parser.add_argument("--cpu-batch", type=int, default=d.cpu_batch, help="images per forward on the CPU")
    parser.add_argument("--gpu-batch", type=int, default=d.gpu_batch, help="images per forward on the GPU")
    parser.add_argument("--img-size", type=int, default=d.img_size, help="input resolution")
    parser.add_argument("--out", default=d.out, help="path prefix: writes PREFIX.csv and PREFIX.json")
    parser.add_argument("--gpu", choices=("auto", "on", "off"), default="auto", help="time on CUDA too")
    parser.add_argument("--tracking-uri", default=MlflowConfig.tracking_uri, help="MLflow store ('' to skip)")


def bench_head_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default=None,
                        help="comma-separated keys of pipeline.bench.head.SHAPES (default: all of them)")
    parser.add_argument("--batches", default="1,64", help="inference batch sizes; the largest is also trained")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per contender (median reported)")
    parser.add_argument("--classes", type=int, default=1000, help="outputs of the head")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--device", default=None, help="a torch device (default: cuda when there is one, else cpu)")


def bench_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=300, help="number of generated JPEGs")
    parser.add_argument("--resize", default="256,80", help="comma-separated short sides to time")
    parser.add_argument("--workers", type=int, default=None, help="prepare processes (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many interleaved runs per method")


def bench_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default="resnet18", help="a registered backbone key")
    parser.add_argument("--head", default="kind=noah", help="head options, e.g. kind=noah,N=4,r=0.5")
    parser.add_argument("--recipe", default="resnet", help="the trainer's recipe (optimizer, schedule, mixup, EMA)")
    parser.add_argument("--img-size", type=int, default=32, help="input resolution")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step")
    parser.add_argument("--steps", type=int, default=6, help="training steps per timed pass")
    parser.add_argument("--repeats", type=int, default=8, help="timed passes of each loop, alternating")
    parser.add_argument("--num-classes", type=int, default=100, help="outputs of the model")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="also time both trainers through torch.compile (auto: on CUDA)")
    parser.add_argument("--data", default=None, help="a prepared dataset: also time the trainer on its loader")
    parser.add_argument("--loader-workers", type=int, default=0, help="decoding processes with --data")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def bench_loader_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=1000, help="ImageNet-like JPEGs to generate (default: "
                        "%(default)s; 80 %% are train)")
    parser.add_argument("--root", help="existing ImageFolder source (with --data: no generation)")
    parser.add_argument("--data", help="the prepared folder built from --root")
    parser.add_argument("--img-size", type=int, default=224, help="output resolution")
    parser.add_argument("--batch", type=int, default=32, help="images per batch")
    parser.add_argument("--workers", type=int, default=None, help="loader workers of the second setting "
                        "(default: all cores); the first is always 1")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many passes per method")


def rehearse_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=20000, help="ImageNet-like JPEGs to generate")
    parser.add_argument("--out", help="work folder, new or empty (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--workers", type=int, default=None, help="processes and loader workers (default: all cores)")
    parser.add_argument("--max-files", type=int, default=200, help="most files the prepared folder may hold")
    parser.add_argument("--cache-type", default=None, help="DVC cache.type of the scratch repository (default: "
                        "the project's .dvc/config, else pipeline.bench.rehearse.DEFAULT_CACHE_TYPE)")


@dataclass(frozen=True)
class Command:
    module: str
    """The module whose `run(args)` does the work: imported only when the command runs."""
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]


COMMANDS: dict[str, Command] = {
    "complexity": Command("pipeline.models.complexity", "Params and MAdds of backbones and heads at ImageNet settings",
                          complexity_arguments),
    "prepare": Command("pipeline.data.prepare", "Build a prepared dataset (manifest, classes, stats)",
                       prepare_arguments),
    "plan": Command("pipeline.study.plan", "Count the trials of every table and estimate their compute",
                    plan_arguments),
    "train": Command("pipeline.training.cli", "Train and evaluate one trial", train_arguments),
    "clean": Command("pipeline.study.clean", "Remove checkpoints no resume or later stage needs (--dry-run: list)",
                     clean_arguments),
    "migrate-tracking": Command("pipeline.training.migrate",
                                "Copy an MLflow store (mlflow.db) onto a tracking server: nothing trains again",
                                migrate_arguments),
    "report": Command("pipeline.report", "Tables 1-11 beside the paper's numbers, figures and an index",
                      report_arguments),
    "benchmark": Command("pipeline.bench.speed", "Table 10: frames/s of baseline vs NOAH models",
                         benchmark_arguments),
    "bench-head": Command("pipeline.bench.head", "Head latency, train step and saved memory: ours vs straightforward",
                          bench_head_arguments),
    "bench-prepare": Command("pipeline.bench.prepare_throughput", "Prepare throughput vs a one-process PIL loop",
                             bench_prepare_arguments),
    "bench-train": Command("pipeline.bench.train", "Trainer images/s vs a bare PyTorch loop", bench_train_arguments),
    "bench-loader": Command("pipeline.bench.loader",
                            "Training loader images/s vs torchvision ImageFolder, decode ceiling",
                            bench_loader_arguments),
    "rehearse": Command("pipeline.bench.rehearse",
                        "Scale rehearsal: generate, prepare, check, DVC-track, read an epoch", rehearse_arguments),
}


def parser_of(name: str) -> argparse.ArgumentParser:
    """The parser of command `name`, with its defaults shown in --help."""
    command = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"python -m pipeline {name}", description=command.help,
                                     formatter_class=HelpFormatter)
    command.add_arguments(parser)
    return parser
