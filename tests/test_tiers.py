"""The fast tier's guard (tests/tiers.py): what it counts as a slow-tier command, and that an unmarked test which
starts one fails there, while other commands run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tiers import slow_command

PYTHON = sys.executable


@pytest.mark.parametrize("args, what", [
    ([str(Path(PYTHON).with_name("dvc")), "status"], "`dvc`"),
    (["ray", "start", "--head"], "`ray`"),
    ("dvc repro", "`dvc`"),
    (["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/16/bin/initdb", "-D", "x"], "`initdb`"),
    (["/venv/lib/ray/core/src/ray/gcs/gcs_server", "--gcs_server_port=0"], "`gcs_server`"),
    ([PYTHON, "-m", "mlflow", "server"], "`python -m mlflow`"),
    ([PYTHON, "stages/study.py", "--params", "p.yaml"], "the stage stages/study.py"),
    ([Path(PYTHON), Path("/repo/stages/prepare.py")], "the stage /repo/stages/prepare.py"),
    ([PYTHON, "-m", "pipeline", "train", "--epochs", "1"], "`python -m pipeline train`"),
    ([PYTHON, "-m", "pipeline", "--help"], None),
    ([PYTHON, "-m", "pipeline", "train", "--help"], None),
    ([PYTHON, "-m", "pipeline"], None),
    ([PYTHON, "-c", "print(1)"], None),
    (["git", "rev-parse", "HEAD"], None),
    ([str(Path(PYTHON).with_name("ruff")), "check", "stages/study.py"], None),
    ([], None),
    ("echo 'unbalanced", None),
])
def test_slow_commands_are_ray_dvc_servers_stages_and_pipeline_commands(args: list, what: str | None) -> None:
    assert slow_command(args) == what


def test_an_unmarked_test_that_starts_a_slow_command_fails_and_others_run() -> None:
    """This test is unmarked, so the guard is on: `dvc` fails it (pytest's Failed, which `except Exception`
    does not catch) before anything starts; a plain command runs."""
    with pytest.raises(pytest.fail.Exception, match=r"starts `dvc`.*mark it @pytest.mark.slow"):
        try:
            subprocess.run([str(Path(PYTHON).with_name("dvc")), "version"], capture_output=True, timeout=60)
        except Exception:  # what a test that tolerates a failing command does
            pass
    assert subprocess.run([PYTHON, "-c", "print(1)"], capture_output=True, text=True, timeout=60).stdout == "1\n"


@pytest.mark.slow
def test_a_slow_test_may_start_one() -> None:
    proc = subprocess.run([str(Path(PYTHON).with_name("dvc")), "version"], capture_output=True, timeout=120)
    assert proc.returncode == 0
