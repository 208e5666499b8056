"""`python -m pipeline train`: train and evaluate one trial from the command line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..config import PARAMS, TrainConfig, load_params, parse, parse_head_spec, to_dict
from ..utils.interrupt import Interrupted
from .run import run_trial
from .trial import resolve_trial


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, help="a backbones.csv key, e.g. resnet18")
    parser.add_argument("--head", default="kind=noah", help="head options, e.g. kind=noah,N=4,r=0.5")
    parser.add_argument("--recipe", default="resnet", help="a recipe name of params.yaml `recipes:`")
    parser.add_argument("--data", required=True, help="a prepared dataset folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (lr scales with it)")
    parser.add_argument("--experiment", default="train", help="MLflow experiment name")
    parser.add_argument("--params", default=None,
                        help="read `recipes`, `mlflow` and `train` from this file (default: the repository's)")
    parser.add_argument("--tracking-uri", default=None, help="default: params.yaml mlflow.tracking_uri")
    parser.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (1: in this process)")
    parser.add_argument("--gpu", choices=("auto", "yes", "no"), default=None)
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="decoding processes (default: params.yaml train.loader_workers; null there: CPUs - 1)")
    parser.add_argument("--decode", choices=("auto", "cpu", "gpu"), default=None,
                        help="where JPEGs are decoded (default: params.yaml train.decode)")
    parser.add_argument("--checkpoint-dir", default=None, help="default: checkpoints/<trial_id>")
    parser.add_argument("--log-weights", action="store_true", help="store the final weights in MLflow")
    parser.add_argument("--retrain", action="store_true", help="train even if a FINISHED run exists")


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params or PARAMS)
    overrides = {k: v for k, v in (("num_workers", args.num_workers), ("loader_workers", args.loader_workers),
                                   ("decode", args.decode)) if v is not None}
    if args.gpu is not None:
        overrides["use_gpu"] = {"auto": None, "yes": True, "no": False}[args.gpu]
    train = parse(TrainConfig, {**to_dict(params.train), **overrides}, "train")
    tracking = dataclasses.replace(params.mlflow, tracking_uri=args.tracking_uri or params.mlflow.tracking_uri,
                                   log_weights=args.log_weights or params.mlflow.log_weights)
    trial = resolve_trial({"backbone": args.backbone, "head": parse_head_spec(args.head), "recipe": args.recipe,
                           "data_dir": args.data, "seed": args.seed, "img_size": args.img_size,
                           "epochs": args.epochs, "batch_size": args.batch_size}, params.recipes)
    try:
        result = run_trial(trial, train=train, tracking=tracking, experiment=args.experiment,
                           checkpoint_dir=args.checkpoint_dir, reuse=not args.retrain)
    except Interrupted as err:
        print(f"interrupted by {err}: the run is marked KILLED, its checkpoint kept", file=sys.stderr)
        return 128 + err.signum
    print(json.dumps(result, indent=2))
    return 0
