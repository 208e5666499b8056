"""DVC stage `report`: every table (Markdown and CSV), the figures, reports/README.md and the metrics and plot
data DVC reads (reports/metrics, reports/plots), all under its out folder reports/, from results/ (results/study/
for the study stage's tables), the MLflow store and the trainer's checkpoints (for the attention maps). Never
trains; runs in seconds."""
import sys

import workspace  # noqa: F401 - first: this checkout's `pipeline`, not the installed one

from pipeline.config import REPORTS, RESULTS
from pipeline.report import build_reports
from pipeline.utils.stage import run_stage


def main(params, _):
    build_reports(RESULTS, REPORTS, params.mlflow.tracking_uri, checkpoints=params.train.checkpoint_root)


if __name__ == "__main__":
    sys.exit(run_stage(main, sys.argv[1:]))
