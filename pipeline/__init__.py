"""NOAH experiment pipeline: models, data, training, sweeps and reports for the NOAH paper."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PAPER_TABLES = Path(__file__).parent / "paper"
