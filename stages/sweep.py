"""DVC stage `sweep@TABLE`: one paper table's grid through Ray Tune (pipeline/sweep.py)."""
import sys

from pipeline.study import run_stage
from pipeline.sweep import sweep_stage

if __name__ == "__main__":
    sys.exit(run_stage(sweep_stage, sys.argv[1:]))
