"""The fast tier's guard (`python -m pytest -m "not slow"`): a test not marked `slow` may not start what makes a
test slow: Ray, DVC, PostgreSQL or an MLflow server, a stage (`stages/*.py`) or a pipeline command
(`python -m pipeline COMMAND`, its `--help` aside), nor use the fixtures that start them. Such a test fails
at that point, naming what it started; registered by tests/conftest.py."""
from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

SLOW_FIXTURES = ("ray_cluster", "tracking_server")
SLOW_PROGRAMS = frozenset({"dvc", "ray", "raylet", "gcs_server", "initdb", "pg_ctl", "postgres", "mlflow"})
"""Programs (or `python -m` modules) that only slow tests start; raylet and gcs_server: an in-process `ray.init`."""


def slow_command(args: Any) -> str | None:
    """What makes a command (a `subprocess.Popen` args value) one for the slow tier, or None."""
    if isinstance(args, str | bytes | os.PathLike):  # a command line (shell=True) or one program
        try:
            argv = shlex.split(os.fsdecode(args))
        except ValueError:  # unbalanced quotes: the shell's to report
            argv = os.fsdecode(args).split()
    else:
        argv = [os.fsdecode(a) for a in args]
    if not argv:
        return None
    programs = [argv[0], *argv[argv.index("--") + 1:][:1]] if "--" in argv else [argv[0]]  # runuser … -- initdb
    for program in programs:
        if Path(program).name in SLOW_PROGRAMS:
            return f"`{Path(program).name}`"
    if not Path(argv[0]).name.startswith("python"):
        return None
    stages = [a for a in argv[1:] if a.endswith(".py") and Path(a).parent.name == "stages"]
    if stages:
        return f"the stage {stages[0]}"
    if "-m" in argv[:-1]:
        module, rest = argv[argv.index("-m") + 1], argv[argv.index("-m") + 2:]
        if module in SLOW_PROGRAMS:
            return f"`python -m {module}`"
        if module == "pipeline" and rest and not {"-h", "--help"} & set(rest):
            return f"`python -m pipeline {rest[0]}`"
    return None


def _refuse(nodeid: str, what: str) -> None:
    pytest.fail(f"{nodeid} starts {what}, which the fast tier (`-m \"not slow\"`) must not: mark it "
                "@pytest.mark.slow (tests/tiers.py)", pytrace=False)


@contextmanager
def refusing_slow_commands(nodeid: str) -> Iterator[None]:
    """While inside, starting a slow-tier command fails the test (pytest's Failed: not caught by `except
    Exception`)."""
    original = subprocess.Popen.__init__

    def guarded(self: subprocess.Popen, args: Sequence[Any] | str, *more: Any, **options: Any) -> None:
        what = slow_command(args)
        if what is not None:
            _refuse(nodeid, what)
        original(self, args, *more, **options)

    subprocess.Popen.__init__ = guarded  # type: ignore[method-assign]
    try:
        yield
    finally:
        subprocess.Popen.__init__ = original  # type: ignore[method-assign]


def _guarded(item: pytest.Item) -> bool:
    return item.get_closest_marker("slow") is None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """Setup and call only: a session fixture's teardown (stopping the tracking server) may fall in any test's."""
    if not _guarded(item):
        return (yield)
    fixtures = [f for f in SLOW_FIXTURES if f in getattr(item, "fixturenames", ())]
    if fixtures:
        _refuse(item.nodeid, f"the fixture {fixtures[0]}")
    with refusing_slow_commands(item.nodeid):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    if not _guarded(item):
        return (yield)
    with refusing_slow_commands(item.nodeid):
        return (yield)
