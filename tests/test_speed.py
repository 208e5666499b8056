"""Table 10 benchmark: the interval statistics on hand-worked numbers, the adaptive rounds of one real pair, and a
small real run (2 backbones, tiny images, few rounds) into CSV, JSON and MLflow. Timings are never asserted on,
only the structure and consistency of what is written (machines are noisy)."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.__main__ import main
from pipeline.bench.speed import (
    COLUMNS,
    INTERVAL_COLUMNS,
    PAPER_COLUMNS,
    benchmark_backbone,
    overhead_pct,
    paper_rows,
    resolve_backbones,
    run_benchmark,
    time_pair,
)
from pipeline.config import BenchmarkConfig, ConfigError
from pipeline.models import build_model, list_backbones
from pipeline.paper import PAPER_TABLES
from pipeline.utils.stats import above_chance, mean, resolved, sample_std, t_interval


def test_overhead_formula_reproduces_the_paper():
    """(vanilla FPS - NOAH FPS) / vanilla FPS × 100 gives every printed overhead of Table 10 (to rounding)."""
    with open(PAPER_TABLES / "table10_speed.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(PAPER_TABLES / "backbones.csv", newline="") as f:  # Table 10 times every backbone of Tables 1-3
        assert sorted(r["key"] for r in rows) == sorted(r["key"] for r in csv.DictReader(f))
    for row in rows:
        for dev in ("gpu", "cpu"):
            ours = overhead_pct(float(row[f"vanilla_{dev}_fps"]), float(row[f"noah_{dev}_fps"]))
            assert ours == pytest.approx(float(row[f"{dev}_overhead_pct"]), abs=0.01), (row["key"], dev)
    assert overhead_pct(10.0, 8.0) == pytest.approx(20.0)
    assert overhead_pct(10.0, 12.0) == pytest.approx(-20.0)


def test_stats_on_hand_worked_numbers():
    """[1, 2, 3, 4]: mean 2.5, s = √(5/3) = 1.2910, s/√4 = 0.6455, t(0.975, 3) = 3.1824 -> 2.5 ± 2.0543;
    [1, 2]: s/√2 = 0.5, t(0.975, 1) = 12.7062 -> 1.5 ± 6.3531."""
    assert t_interval([1, 2, 3, 4]) == pytest.approx((0.4457, 4.5543), abs=1e-4)
    assert t_interval([1, 2]) == pytest.approx((1.5 - 6.3531, 1.5 + 6.3531), abs=1e-4)
    assert t_interval([5.0, 5.0, 5.0]) == (5.0, 5.0)
    assert t_interval([1.0]) is None and t_interval([]) is None
    assert mean([2, 4, 4, 4, 5, 5, 7, 9]) == 5.0 and mean([]) is None
    assert sample_std([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx((32 / 7) ** 0.5) and sample_std([3.0]) is None
    assert resolved((0.1, 2.0)) and resolved((-2.0, -0.1))
    assert not resolved((-0.1, 2.0)) and not resolved(None) and not resolved((2.0, 2.0))  # zero width: no evidence
    # 8 classes (12.5%): 20/128 right is not above chance (binomial p = 0.17), 26/128 is (p = 0.008)
    assert not above_chance(15.625, 12.5, 128) and above_chance(20.3125, 12.5, 128)
    assert above_chance(15.625, 12.5, 128 * 10)  # the same rate over ten seeds is


def test_time_pair_stops_at_the_minimum_the_cap_or_the_budget():
    """Rounds go past the minimum only while the interval is wider than the target, up to the cap or budget."""
    pair = {name: build_model("resnet18", {"kind": kind}, 10, 32).eval()
            for name, kind in (("vanilla", "baseline"), ("noah", "noah"))}
    threads = torch.get_num_threads()
    for (least, most, seconds, target), rounds in [((3, 50, 60, 1e9), 3),  # any interval is narrow enough
                                                   ((2, 6, 60, 0), 6),  # none is: the cap stops it
                                                   ((2, 50, 0, 0), 2)]:  # the budget is spent at once
        timing = time_pair(pair, "cpu", 1, 32, least, most, seconds, target, warmup=0)
        assert len(timing.overheads) == rounds and set(timing.fps) == {"vanilla", "noah"}
        centre, low, high = timing.overhead
        assert low <= centre <= high and (low, high) == t_interval(timing.overheads)
        assert torch.get_num_threads() == threads  # the one-core setting is restored
    with pytest.raises(ValueError, match="two rounds"):
        time_pair(pair, "cpu", 1, 32, 1, 5, 60, 0, warmup=0)


@pytest.mark.slow
def test_small_benchmark_writes_table10_and_one_mlflow_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "results" / "table10"
    cfg = BenchmarkConfig(backbones=("deit_tiny_050", "resnet18"), cpu_repeats=2, cpu_max_repeats=4, cpu_warmup=0,
                          img_size=32, out=str(out))
    threads = torch.get_num_threads()
    rows = run_benchmark(cfg, uri, use_gpu=False)
    assert torch.get_num_threads() == threads  # the one-core setting is restored
    paper = paper_rows()
    with open(out.with_suffix(".csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == COLUMNS and set(PAPER_COLUMNS) <= set(COLUMNS)
    assert [r["key"] for r in table] == ["resnet18", "deit_tiny_050"]  # Table 10's order
    assert [int(r["row"]) for r in table] == [4, 15]
    for r in table:
        vanilla, noah = float(r["vanilla_cpu_fps"]), float(r["noah_cpu_fps"])
        assert vanilla > 0 and noah > 0 and float(r["noah_cpu_spread_pct"]) >= 0
        low, centre, high = (float(r[f"cpu_overhead_{c}"]) for c in ("low", "pct", "high"))
        assert low <= centre <= high and 2 <= int(r["cpu_rounds"]) <= 4
        assert r["cpu_resolved"] == str(high - low < float(paper[r["key"]]["cpu_overhead_pct"]))
        assert r["vanilla_gpu_fps"] == r["gpu_overhead_pct"] == r["gpu_rounds"] == ""  # no GPU timed
    assert float(table[0]["vanilla_params_m"]) == pytest.approx(11.69, abs=0.01)
    assert float(table[0]["noah_params_m"]) == pytest.approx(11.70, abs=0.01)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["meta"]["backbones"] == "resnet18,deit_tiny_050" and data["meta"]["cpu_threads"] == 1
    assert [r["key"] for r in data["rows"]] == [r["key"] for r in rows] == ["resnet18", "deit_tiny_050"]
    for r in data["rows"]:  # every round's overhead is kept, and gives the interval
        assert len(r["cpu_round_overheads_pct"]) == r["cpu_rounds"] and isinstance(r["cpu_resolved"], bool)
        assert (mean(r["cpu_round_overheads_pct"]), *t_interval(r["cpu_round_overheads_pct"])) == pytest.approx(
            (r["cpu_overhead_pct"], r["cpu_overhead_low"], r["cpu_overhead_high"]), abs=0.01)
    assert not list(out.parent.glob(".*.tmp"))  # atomic writes leave no temp files

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("table10").experiment_id])
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert metrics["resnet18/noah_cpu_fps"] == pytest.approx(float(table[0]["noah_cpu_fps"]))
    assert "deit_tiny_050/cpu_overhead_pct" in metrics and runs[0].data.params["cpu_repeats"] == "2"
    assert metrics["resnet18/cpu_rounds"] == float(table[0]["cpu_rounds"])
    assert metrics["resnet18/cpu_resolved"] in (0.0, 1.0) and runs[0].data.params["cpu_max_repeats"] == "4"
    assert set(INTERVAL_COLUMNS) <= set(COLUMNS)
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert artifacts == {"table10.csv", "table10.json"}


def test_default_covers_every_registered_backbone_in_paper_order():
    keys = resolve_backbones(BenchmarkConfig().backbones)
    assert sorted(keys) == sorted(list_backbones())
    printed = list(paper_rows())
    assert keys[:len(printed)] == printed and keys[0] == "resnet152"  # Table 10's order, then any it does not print


def test_a_backbone_without_a_paper_row_is_timed_for_the_minimum_rounds_and_left_unresolved():
    """A registered backbone Table 10 does not print (here resnet18 given no paper row) has no paper overhead
    to resolve against: the minimum rounds, `cpu_resolved` None (empty in the CSV, no verdict in the report)."""
    cfg = BenchmarkConfig(backbones=("resnet18",), cpu_repeats=2, cpu_max_repeats=50, cpu_warmup=0, img_size=32)
    row = benchmark_backbone("resnet18", None, cfg, use_gpu=False)
    assert row["key"] == "resnet18" and row["cpu_rounds"] == 2 and row["cpu_resolved"] is None


def test_bad_options_fail_before_any_work(tmp_path, capsys):
    with pytest.raises(ConfigError, match="benchmark.backbones: got 'resnet19'"):
        resolve_backbones(("resnet18", "resnet19"))
    assert main(["benchmark", "--backbones", "resnet18", "--cpu-repeats", "0", "--out", str(tmp_path / "t")]) == 2
    assert "benchmark.cpu_repeats: got 0; allowed: an integer >= 2 (an interval needs two" in capsys.readouterr().err
    assert main(["benchmark", "--backbones", "resnet18", "--cpu-max-repeats", "3", "--out", str(tmp_path / "t")]) == 2
    assert "benchmark.cpu_max_repeats: got 3; allowed: an integer >= cpu_repeats (5)" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["benchmark", "--backbones", "resnet18", "--gpu", "on", "--out", str(tmp_path / "t")]) == 2
        assert "--gpu" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
