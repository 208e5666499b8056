"""NOAH experiment pipeline: models, data, training, sweeps and reports for the NOAH paper."""
from pathlib import Path

PAPER_TABLES = Path(__file__).parent / "paper"
