"""The command line a user meets first: `--help` answers on stdout with defaults shown, and reading the
options imports none of the heavy libraries (torch, timm, Ray, MLflow) that make it take seconds."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline import REPO_ROOT
from pipeline.commands import COMMANDS

HEAVY = ("torch", "timm", "ray", "mlflow")


def _pipeline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


def test_help_lists_every_command_on_stdout() -> None:
    proc = _pipeline("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert all(f"  {name} " in proc.stdout for name in COMMANDS)


def test_no_command_is_a_usage_error_on_stderr() -> None:
    proc = _pipeline()
    assert proc.returncode == 2 and proc.stdout == "" and "usage:" in proc.stderr


@pytest.mark.parametrize("name", ["train", "benchmark"])
def test_command_help_is_on_stdout_with_defaults(name: str) -> None:
    proc = _pipeline(name, "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith(f"usage: python -m pipeline {name}")
    assert "(default: " in proc.stdout


def test_train_help_shows_the_defaults_a_user_trains_with() -> None:
    out = " ".join(_pipeline("train", "--help").stdout.split())  # argparse wraps lines
    assert "(default: 224)" in out and "(default: kind=noah)" in out
    assert "(default: None)" not in out and "(default: False)" not in out


def test_reading_every_command_s_options_imports_no_heavy_library() -> None:
    code = ("import json, sys\nfrom pipeline.commands import COMMANDS, parser_of\n"
            "for name in COMMANDS:\n    parser_of(name).format_help()\n"
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_every_command_module_has_a_run() -> None:
    """Each command's module is only named in COMMANDS: check the names resolve (importing them is slow,
    so by file)."""
    for command in COMMANDS.values():
        base = REPO_ROOT.joinpath(*command.module.split("."))
        source = (base / "__init__.py") if base.is_dir() else base.with_suffix(".py")
        assert "\ndef run(args: argparse.Namespace) -> int:" in source.read_text(), command.module
