"""Table 10 benchmark: a small real run (2 backbones, tiny images, one repeat) into CSV, JSON and MLflow."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.__main__ import main
from pipeline.bench.speed import COLUMNS, PAPER_COLUMNS, overhead_pct, resolve_backbones, run_benchmark
from pipeline.config import BenchmarkConfig, ConfigError
from pipeline.paper import PAPER_TABLES


def test_overhead_formula_reproduces_the_paper():
    """(vanilla FPS - NOAH FPS) / vanilla FPS × 100 gives every printed overhead of Table 10 (to rounding)."""
    with open(PAPER_TABLES / "table10_speed.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 26
    for row in rows:
        for dev in ("gpu", "cpu"):
            ours = overhead_pct(float(row[f"vanilla_{dev}_fps"]), float(row[f"noah_{dev}_fps"]))
            assert ours == pytest.approx(float(row[f"{dev}_overhead_pct"]), abs=0.01), (row["key"], dev)
    assert overhead_pct(10.0, 8.0) == pytest.approx(20.0)
    assert overhead_pct(10.0, 12.0) == pytest.approx(-20.0)


def test_small_benchmark_writes_table10_and_one_mlflow_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "results" / "table10"
    cfg = BenchmarkConfig(backbones=("deit_tiny_050", "resnet18"), cpu_repeats=2, cpu_warmup=0, img_size=32,
                          out=str(out))
    threads = torch.get_num_threads()
    rows = run_benchmark(cfg, uri, use_gpu=False)
    assert torch.get_num_threads() == threads  # the one-core setting is restored
    with open(out.with_suffix(".csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == COLUMNS and set(PAPER_COLUMNS) <= set(COLUMNS)
    assert [r["key"] for r in table] == ["resnet18", "deit_tiny_050"]  # Table 10's order
    assert [int(r["row"]) for r in table] == [4, 15]
    for r in table:
        vanilla, noah = float(r["vanilla_cpu_fps"]), float(r["noah_cpu_fps"])
        assert vanilla > 0 and noah > 0 and float(r["noah_cpu_spread_pct"]) >= 0
        assert float(r["cpu_overhead_pct"]) == pytest.approx(overhead_pct(vanilla, noah), abs=0.05)
        assert r["vanilla_gpu_fps"] == r["gpu_overhead_pct"] == ""  # no GPU timed
    assert float(table[0]["vanilla_params_m"]) == pytest.approx(11.69, abs=0.01)
    assert float(table[0]["noah_params_m"]) == pytest.approx(11.70, abs=0.01)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["meta"]["backbones"] == "resnet18,deit_tiny_050" and data["meta"]["cpu_threads"] == 1
    assert [r["key"] for r in data["rows"]] == [r["key"] for r in rows] == ["resnet18", "deit_tiny_050"]
    assert not list(out.parent.glob(".*.tmp"))  # atomic writes leave no temp files

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("table10").experiment_id])
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert metrics["resnet18/noah_cpu_fps"] == pytest.approx(float(table[0]["noah_cpu_fps"]))
    assert "deit_tiny_050/cpu_overhead_pct" in metrics and runs[0].data.params["cpu_repeats"] == "2"
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert artifacts == {"table10.csv", "table10.json"}


def test_default_covers_all_26_in_paper_order():
    keys = resolve_backbones(BenchmarkConfig().backbones)
    with open(PAPER_TABLES / "backbones.csv", newline="") as f:
        assert sorted(keys) == sorted(r["key"] for r in csv.DictReader(f))
    assert len(keys) == 26 and keys[0] == "resnet152"


def test_bad_options_fail_before_any_work(tmp_path, capsys):
    with pytest.raises(ConfigError, match="benchmark.backbones: got 'resnet19'"):
        resolve_backbones(("resnet18", "resnet19"))
    assert main(["benchmark", "--backbones", "resnet18", "--cpu-repeats", "0", "--out", str(tmp_path / "t")]) == 2
    assert "benchmark.cpu_repeats: got 0; allowed: an integer >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["benchmark", "--backbones", "resnet18", "--gpu", "on", "--out", str(tmp_path / "t")]) == 2
        assert "--gpu" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
