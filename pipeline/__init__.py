"""NOAH experiment pipeline: models, data, training, sweeps and reports for the NOAH paper."""
import csv
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PAPER_TABLES = Path(__file__).parent / "paper"


def read_paper_table(name: str) -> list[dict[str, str]]:
    """The rows of one of the paper's CSVs (`pipeline/paper/<name>`), in the paper's order."""
    with open(PAPER_TABLES / name, newline="") as f:
        return list(csv.DictReader(f))
