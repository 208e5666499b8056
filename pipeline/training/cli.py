"""`python -m pipeline train`: train and evaluate one trial from the command line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from mlflow.exceptions import MlflowException

from ..config import PARAMS, TrainConfig, check_name, load_params, parse, parse_head_spec, to_dict
from ..utils.interrupt import Interrupted
from ..utils.io import require_writable
from .engine import NonFiniteLossError
from .record import checkpoint_root
from .run import run_trial
from .tracking import check_store, first_line
from .trial import resolve_trial


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params or PARAMS)
    overrides = {k: v for k, v in (("num_workers", args.num_workers), ("loader_workers", args.loader_workers),
                                   ("decode", args.decode)) if v is not None}
    for key, value in (("use_gpu", args.gpu), ("compile", args.compile)):
        if value is not None:
            overrides[key] = {"auto": None, "yes": True, "no": False}[value]
    train = parse(TrainConfig, {**to_dict(params.train), **overrides}, "train")
    tracking = dataclasses.replace(params.mlflow, tracking_uri=args.tracking_uri or params.mlflow.tracking_uri,
                                   log_weights=args.log_weights or params.mlflow.log_weights)
    check_name("--experiment", args.experiment)
    trial = resolve_trial({"backbone": args.backbone, "head": parse_head_spec(args.head), "recipe": args.recipe,
                           "data_dir": args.data, "seed": args.seed, "img_size": args.img_size,
                           "width": args.width, "epochs": args.epochs, "batch_size": args.batch_size}, params.recipes)
    check_store(tracking.tracking_uri, "--tracking-uri" if args.tracking_uri else "mlflow.tracking_uri")
    require_writable(*((args.checkpoint_dir, "--checkpoint-dir") if args.checkpoint_dir else
                       (checkpoint_root(train.checkpoint_root), "train.checkpoint_root")))
    try:
        result = run_trial(trial, train=train, tracking=tracking, experiment=args.experiment,
                           checkpoint_dir=args.checkpoint_dir, reuse=not args.retrain)
    except Interrupted as err:
        print(f"interrupted by {err}: the run is marked KILLED, its checkpoint kept", file=sys.stderr)
        return 128 + err.signum
    except NonFiniteLossError as err:
        print(f"error: the training diverged ({err}); the run is marked FAILED: try a lower lr", file=sys.stderr)
        return 2
    except (OSError, MlflowException) as err:  # a full disk, a file-size limit, a permission taken away mid-run
        print(f"error: {first_line(err)}; the run is marked FAILED where its store allows, its last good "
              "checkpoint kept", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0
