"""Shared fixtures: a tiny prepared built-in dataset, params files that point every stage at it, a
two-node Ray cluster and an MLflow tracking server on PostgreSQL, both on 127.0.0.1."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tiers
import torch
import yaml
from tracking_server import TrackingServer, free_port

from pipeline.config import PARAMS, BuiltinDataConfig, PrepareConfig
from pipeline.data.prepare import prepare

# Token authentication, as on every node of a real cluster (and a local Ray's default). Set here, before any
# test module imports the study (and with it Ray), because Ray reads RAY_AUTH_MODE once, when first imported.
os.environ.setdefault("RAY_AUTH_MODE", "token")


def pytest_configure(config: pytest.Config) -> None:
    """The fast tier's guard (tests/tiers.py): an unmarked test that starts Ray, DVC, a stage or a server fails."""
    config.pluginmanager.register(tiers, "tiers")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` (the GPU suite, `python -m pytest -m gpu`) skip, saying why, without CUDA."""
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason=f"needs a CUDA GPU (torch {torch.__version__} sees none here); "
                                       "the GPU suite: python -m pytest -m gpu")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


TINY_BUILTIN = {"num_classes": 4, "train_per_class": 12, "val_per_class": 4, "image_size": 48}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 shape classes, 48 training and 16 validation images, short side 40 px."""
    out = tmp_path_factory.mktemp("tiny") / "builtin"
    prepare(PrepareConfig(source="builtin", out=str(out), resize=40, builtin=BuiltinDataConfig(**TINY_BUILTIN)),
            workers=1)
    return out


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


@pytest.fixture
def tiny_params(tmp_path: Path, tiny_data: Path) -> Callable[..., Path]:
    """Write a params.yaml: the repository's, at 32 px for 1 epoch on `tiny_data`, tracked in a temporary
    MLflow store, with `changes` merged in; returns its path."""

    def make(**changes: Any) -> Path:
        base = yaml.safe_load(PARAMS.read_text())
        tiny = {
            "profile": "smoke",
            "seeds": [0],
            "profiles": {"smoke": {"dataset": "builtin", "reid_dataset": None, "img_size": 32, "epochs": 1,
                                   "batch_size": 16}},
            "datasets": {"builtin": {"source": "builtin", "out": str(tiny_data), "resize": 40,
                                     "builtin": TINY_BUILTIN}},
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            "ray": {"num_cpus": 2, "storage_path": str(tmp_path / "ray_results")},
            "train": {"checkpoint_root": str(tmp_path / "checkpoints"), "progress": "line"},
        }
        data = _merge(base, tiny)
        data["profiles"] = tiny["profiles"]
        data["datasets"] = tiny["datasets"]
        data = _merge(data, changes)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return make


def _ray_start(*args: str, env: dict[str, str]) -> None:
    subprocess.run(["ray", "start", *args, "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=180)


@pytest.fixture
def ray_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """Two Ray nodes on 127.0.0.1 (`ray start --head` and `ray start --address`, one CPU and a resource of
    their own each, token auth); yields the head's address and the temp folder that names every process of
    this cluster, by which it is stopped afterwards (never `ray stop`, which would end any other Ray)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    address = f"127.0.0.1:{free_port()}"
    try:
        _ray_start("--head", f"--port={address.split(':')[1]}", f"--temp-dir={temp}", "--include-dashboard=false",
                   '--resources={"head_node": 1}', env=env)
        _ray_start(f"--address={address}", '--resources={"second_node": 1}', env=env)
        yield address, temp
    finally:
        subprocess.run(["pkill", "-9", "-f", temp], check=False)


@pytest.fixture(scope="session")
def tracking_server() -> Iterator[TrackingServer]:
    """A real MLflow tracking server on PostgreSQL, on 127.0.0.1, for the whole session; stopped afterwards
    with its database."""
    server = TrackingServer(Path(tempfile.mkdtemp(prefix="mlsrv", dir="/tmp")))
    try:
        server.start_database()
        server.start()
        yield server
    finally:
        server.stop()
        server.stop_database()
        shutil.rmtree(server.folder, ignore_errors=True)
