"""DVC stage `sweep@TABLE`: one paper table's grid through Ray Tune (pipeline/study/sweep.py)."""
import sys

from pipeline.study.sweep import sweep_stage
from pipeline.utils.stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage(sweep_stage, sys.argv[1:]))
