"""The paper's tables as CSV (`pipeline/paper/*.csv`, described in its README.md) and their reader."""
import csv
from pathlib import Path

PAPER_TABLES = Path(__file__).parent


def read_paper_table(name: str) -> list[dict[str, str]]:
    """The rows of one of the paper's CSVs (`pipeline/paper/<name>`), in the paper's order."""
    with open(PAPER_TABLES / name, newline="") as f:
        return list(csv.DictReader(f))
