"""DVC stage `benchmark`: Table 10, frames/s of the baseline/NOAH pairs (pipeline/bench/speed.py), into
results/table10.csv|json and MLflow, as params.yaml's `benchmark` section says."""
import sys

import workspace  # noqa: F401 - first: this checkout's `pipeline`, not the installed one

from pipeline.bench.speed import run_benchmark
from pipeline.utils.stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage(lambda params, _: run_benchmark(params.benchmark, params.mlflow.tracking_uri), sys.argv[1:]))
