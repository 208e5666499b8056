"""DVC stage `prepare`: the active profile's datasets (or those named) from params.yaml's `datasets:`."""
import sys

import workspace  # noqa: F401 - first: this checkout's `pipeline`, not the installed one

from pipeline.data.prepare import prepare_stage
from pipeline.utils.stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage(prepare_stage, sys.argv[1:]))
