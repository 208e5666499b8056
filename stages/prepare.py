"""DVC stage `prepare`: build the prepared datasets named on the command line (default: the active
profile's `dataset` and `reid_dataset`) from `params.yaml`'s `datasets:` entries."""
from __future__ import annotations

import sys

import yaml

from pipeline.config import ConfigError
from pipeline.data.prepare import datasets_from_params, prepare


def main(argv: list[str]) -> int:
    with open("params.yaml") as f:
        params = yaml.safe_load(f)
    try:
        for cfg in datasets_from_params(params, argv).values():
            prepare(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
