"""The `main` of every DVC stage script: params validated first, errors mapped to exit codes."""
from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from typing import Any

from ..config import PARAMS, ConfigError, Params, load_params
from .interrupt import Interrupted, interruptible


def run_stage(body: Callable[[Params, list[str]], Any], argv: list[str]) -> int:
    """A DVC stage's whole `main`: `[--params FILE] [ARGS…]`, the params validated first; a bad option
    ends the stage with exit code 2 and one line naming it, before any work starts; SIGINT or SIGTERM with
    128 + the signal."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default=str(PARAMS), help="the params file (default: params.yaml)")
    parser.add_argument("args", nargs="*")
    ns = parser.parse_args(argv)
    try:
        with interruptible():
            body(load_params(ns.params), ns.args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"error: interrupted by {err}; run the stage again to resume", file=sys.stderr)
        gc.freeze()  # exit in seconds: no last full collection over the heap (torch, Ray, MLflow), which takes several
        return 128 + err.signum
    return 0
