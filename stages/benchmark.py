"""DVC stage `benchmark`: Table 10 (frames/s of the 26 baseline/NOAH pairs) with params.yaml's `benchmark`
section (pipeline.config.BenchmarkConfig) into results/table10.csv/.json and MLflow (`mlflow.tracking_uri`).
The logic lives in pipeline/speed.py."""
from __future__ import annotations

import sys

import yaml

from pipeline.config import BenchmarkConfig, ConfigError, MlflowConfig, parse
from pipeline.speed import run_benchmark


def main() -> int:
    with open("params.yaml") as f:
        params = yaml.safe_load(f) or {}
    try:
        cfg = parse(BenchmarkConfig, params.get("benchmark"), "benchmark")
        tracking = parse(MlflowConfig, params.get("mlflow"), "mlflow")
        run_benchmark(cfg, tracking.tracking_uri)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
