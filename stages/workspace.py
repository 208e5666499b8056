"""Imported first by every stage script: the `pipeline` package of the checkout the script is in, not the one
installed in the environment (an editable install points at one checkout). DVC runs a queued or `--temp`
experiment in a copy of the repository under .dvc/tmp/exps/, whose stages must run that copy's code and so
read its params.yaml and write its results/. PYTHONPATH passes the choice on to the processes a stage starts
(a local Ray's workers)."""
import os
import sys
from pathlib import Path

CHECKOUT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, CHECKOUT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (CHECKOUT, os.environ.get("PYTHONPATH")) if p)
