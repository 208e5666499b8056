"""NOAH experiment pipeline: models, data, training, sweeps and reports for the NOAH paper.

Layers, each importing only those below it (tests/test_layout.py holds them to it):
`paper`, `config` → `utils` → `models`, `data` → `training` → `study` → `bench`, `report` → `commands` → `__main__`.
"""
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
"""The checkout this package runs from, and so the workspace a stage runs in (stages/*.py import their own
checkout's package, also in DVC's queued and `--temp` workspaces): its params.yaml, data/, results/, reports/
and Ray folder are that workspace's own."""

SHARED_ROOT = Path(os.environ.get("DVC_ROOT") or REPO_ROOT).resolve()
"""What a relative MLflow store and `train.checkpoint_root` are taken from: the repository DVC runs the stage
for (`DVC_ROOT`, which DVC sets to the main workspace for a queued or `--temp` experiment too), else REPO_ROOT.
Every experiment of a repository so shares one store and one checkpoint root: a trial one has finished, the
next reuses."""
