"""DVC stage `study`: every trial the named tables need, as one Ray Tune schedule, then each table's
results/<table>.json|csv (pipeline/study/sweep.py). `python stages/study.py table1 table2 table3` runs Tables 1-3."""
import sys

import workspace  # noqa: F401 - first: this checkout's `pipeline`, not the installed one

from pipeline.study.sweep import study_stage
from pipeline.utils.stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage(study_stage, sys.argv[1:]))
