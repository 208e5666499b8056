"""NOAH experiment pipeline: models, data, training, sweeps and reports for the NOAH paper.

Layers, each importing only those below it (tests/test_layout.py holds them to it):
`paper`, `config` → `utils` → `models`, `data` → `training` → `study` → `bench`, `report` → `commands` → `__main__`.
"""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
