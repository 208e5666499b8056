"""DVC stage `report`: Tables 4–11 (Markdown and CSV), the figures and reports/README.md from `results/`,
the MLflow store named in `params.yaml` (`mlflow.tracking_uri`) and the trainer's checkpoints
(`train.checkpoint_root`, for the attention maps). Never trains; runs in seconds."""
from __future__ import annotations

import argparse
import sys

import yaml

from pipeline.config import ConfigError, MlflowConfig, TrainConfig, parse
from pipeline.report import add_arguments, run
from pipeline.tracking import REPO_ROOT


def main(argv: list[str]) -> int:
    with open("params.yaml") as f:
        params = yaml.safe_load(f) or {}
    try:
        tracking = parse(MlflowConfig, params.get("mlflow"), "mlflow")
        train = parse(TrainConfig, params.get("train"), "train")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="stages/report.py", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(tracking_uri=tracking.tracking_uri, checkpoints=REPO_ROOT / train.checkpoint_root)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
