"""DVC stage `report`: Tables 4–11 (Markdown and CSV), the figures and reports/README.md from `results/`
and the MLflow store named in `params.yaml` (`mlflow.tracking_uri`). Never trains; runs in seconds."""
from __future__ import annotations

import sys
from pathlib import Path

import yaml

from pipeline.config import ConfigError, MlflowConfig, parse
from pipeline.report import build_reports


def main(argv: list[str]) -> int:
    results, out = (Path(a) for a in (argv + ["results", "reports"][len(argv):])[:2])
    with open("params.yaml") as f:
        params = yaml.safe_load(f) or {}
    try:
        tracking = parse(MlflowConfig, params.get("mlflow"), "mlflow")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    build_reports(results, out, tracking.tracking_uri)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
