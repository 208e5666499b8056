"""DVC stage `prepare`: the active profile's datasets (or those named) from params.yaml's `datasets:`."""
import sys

from pipeline.data.prepare import prepare
from pipeline.study import profile_datasets, run_stage


def main(params, names):
    for cfg in profile_datasets(params, names).values():
        prepare(cfg)


if __name__ == "__main__":
    sys.exit(run_stage(main, sys.argv[1:]))
