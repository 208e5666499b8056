"""DVC stage `study`: every trial of params.yaml's `study.tables` (or of the tables named), as one Ray Tune
schedule, then each table's results/study/<table>.json|csv (pipeline/study/sweep.py). `python stages/study.py
table1 table2 table3` runs Tables 1-3, into results/<table>.json|csv (outside the stage's out folder)."""
import sys

import workspace  # noqa: F401 - first: this checkout's `pipeline`, not the installed one

from pipeline.study.sweep import study_stage
from pipeline.utils.stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage(study_stage, sys.argv[1:]))
