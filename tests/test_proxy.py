"""The one-GPU proxy study: `prepare --classes` on a generated ImageFolder, the proxy profile's own seeds and
tables, its plan, its report's comparison with the paper's deltas, and the proxy table end to end through the
real prepare, study and report stages in a copy of the checkout (tiny data, a handful of steps)."""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import REPO_ROOT
from pipeline.__main__ import main
from pipeline.config import PARAMS, ConfigError, MlflowConfig, PrepareConfig, load_params
from pipeline.data.builtin import SHAPES, draw_shape
from pipeline.data.sources import read_class_list
from pipeline.report import TABLES, build_table
from pipeline.report.proxy import COLUMNS, Comparison
from pipeline.report.specs import backbones, paper_rows
from pipeline.study.cost import Measured, equivalent_tflops, trial_hours
from pipeline.study.plan import plan
from pipeline.study.rows import table_rows

CLASSES = {f"n0100000{i}": kind for i, kind in enumerate(SHAPES[:5])}  # WordNet-like folder names, one shape each
PAPER_DELTAS = {"resnet18": 1.56, "mobilenetv2_050": 3.14, "deit_tiny_050": 5.30, "gmlp_tiny_050": 1.90}


def _imagefolder(root: Path, train: int = 4, val: int = 2) -> Path:
    """root/{train,val}/<wnid>/ with `train` and `val` generated images per class, JPEG and PNG."""
    for split_id, (split, n) in enumerate((("train", train), ("val", val))):
        for label, (wnid, kind) in enumerate(CLASSES.items()):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                img = draw_shape(kind, 40, np.random.default_rng([split_id, label, i]), clutter=0.3)
                img.save(folder / f"{wnid}_{i}.{'jpg' if i % 2 else 'png'}")
    return root


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _prepare(src: Path, classes: Path, out: Path) -> int:
    return main(["prepare", "--source", "imagefolder", "--root", str(src), "--classes", str(classes),
                 "--out", str(out), "--workers", "1"])


def test_prepare_classes_keeps_the_listed_classes_labelled_in_the_files_order(tmp_path: Path) -> None:
    src = _imagefolder(tmp_path / "src")
    listed = ["n01000003", "n01000000", "n01000004"]
    classes = tmp_path / "classes.txt"
    classes.write_text(f"# a subset\n{listed[0]}\n\n{listed[1]}   # inline comment\n{listed[2]}\n")
    out = tmp_path / "out"
    assert _prepare(src, classes, out) == 0
    assert json.loads((out / "classes.json").read_text()) == listed
    with open(out / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    assert {(r["split"], r["class"], int(r["label"])) for r in manifest} == \
        {(s, c, listed.index(c)) for s in ("train", "val") for c in listed}
    assert len(manifest) == 3 * (4 + 2) and all(r["path"].split("/")[1] in listed for r in manifest)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["num_classes"] == 3 and stats["rejected"] == []  # left-out folders are not inputs


@pytest.mark.parametrize("where", ["both", "val"])
def test_a_missing_class_fails_with_one_line_naming_it_and_nothing_is_touched(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    src = _imagefolder(tmp_path / "src")
    if where == "val":
        shutil.rmtree(src / "val" / "n01000002")
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("n01000001\nn01000000\n")
    out = tmp_path / "out"
    assert _prepare(src, good, out) == 0
    before = _tree(out), _tree(src)
    missing = "n09999999" if where == "both" else "n01000002"
    bad.write_text(f"n01000000\n{missing}\nn01000001\n")
    capsys.readouterr()
    assert _prepare(src, bad, out) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: classes: got '{missing}'"), lines
    assert ("none in train/ or val/" if where == "both" else "none in val/") in lines[0]
    assert (_tree(out), _tree(src)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "good.txt", "out", "src"]  # no work folder


def test_a_class_list_names_each_class_once_and_only_for_an_imagefolder(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    src = _imagefolder(tmp_path / "src", train=1, val=1)
    twice = tmp_path / "twice.txt"
    twice.write_text("n01000000\nn01000001\nn01000000\n")
    assert _prepare(src, twice, tmp_path / "out") == 2
    assert "lines 1 and 3" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="^classes: got 'x.txt'; allowed: null for source 'builtin'"):
        PrepareConfig(source="builtin", classes="x.txt")


def test_the_shipped_imagenet100_list_is_cmcs_hundred_wordnet_ids_with_its_source() -> None:
    path = REPO_ROOT / "pipeline" / "data" / "imagenet100.txt"
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any("HobbitLong/CMC" in line for line in header) and any("Contrastive Multiview Coding" in h for h in header)
    params = load_params()
    assert params.datasets["imagenet100"].classes == "pipeline/data/imagenet100.txt"
    ids = read_class_list(path)
    assert len(ids) == 100 and all(len(i) == 9 and i.startswith("n") and i[1:].isdigit() for i in ids)


# ---- the proxy profile and table


def test_the_proxy_trains_only_its_table_with_its_own_seeds_and_no_other_profile_trains_it() -> None:
    params = load_params()
    assert params.tables_of("proxy") == ["proxy"] and "proxy" not in params.tables_of("smoke")
    assert params.tables_of("imagenet") == params.tables_of("smoke")
    at = params.for_tables(["proxy"])
    assert at.profile == "proxy" and len(at.trial_seeds) >= 3 and params.trial_seeds == params.seeds
    rows = {rt.row.name: rt for rt in table_rows(at, "proxy")}
    recipes = {name: rt.trials["classify", 0].recipe.name for name, rt in rows.items()}
    assert recipes == {f"{key}_{head}": recipe for key, recipe in (
        ("resnet18", "resnet"), ("mobilenetv2_050", "mobilenet"), ("deit_tiny_050", "deit_pvt"),
        ("gmlp_tiny_050", "mixer_gmlp")) for head in ("baseline", "noah")}
    for rt, paper in zip(rows.values(), paper_rows(TABLES["proxy"])):
        assert (rt.row.row, rt.row.backbone) == (int(paper["row"]), paper["key"])
        if rt.row.head.kind == "noah":  # the paper's N and r for the backbone
            info = backbones()[rt.row.backbone]
            assert (rt.row.head.N, rt.row.head.r) == (info.noah_N, info.noah_r)
    with pytest.raises(ConfigError, match="^tables: got \\['proxy', 'table6'\\]; allowed: tables that train at one"):
        params.for_tables(["proxy", "table6"])
    with pytest.raises(ConfigError, match="^tables: got 'table6'; allowed: a table of profile 'proxy'"):
        dataclasses.replace(params, profile="proxy").for_tables(["table6"])


@pytest.mark.parametrize("change,key", [
    ({"smoke": {"tables": ["proxy"]}}, "profiles.proxy.tables[0]"),  # listed by two profiles
    ({"proxy": {"tables": ["tablez"]}}, "profiles.proxy.tables[0]"),
    ({"proxy": {"seeds": [0, 0, 1]}}, "profiles.proxy.seeds"),
])
def test_bad_profile_tables_and_seeds_name_the_key(tmp_path: Path, change: dict, key: str) -> None:
    data = yaml.safe_load(PARAMS.read_text())
    for name, fields in change.items():
        data["profiles"][name].update(fields)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))  # the second profile to list a table is named
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert err.value.key == key


@pytest.mark.slow
def test_plan_prices_the_proxy_alone_within_a_day_of_one_gpu(tmp_path: Path) -> None:
    params = dataclasses.replace(load_params(), profile="proxy",
                                 mlflow=MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'none.db'}"))
    result = plan(params, gpus=1)
    assert list(result["tables"]) == ["proxy"]
    proxy, total = result["tables"]["proxy"], result["total"]
    assert (proxy["rows"], proxy["unique_trials"]) == (8, 8 * len(params.trial_seeds))
    assert 0 < total["gpu_hours"] <= 24 and total["makespan_hours"] == pytest.approx(total["gpu_hours"], rel=1e-3)


# ---- the report


def test_comparison_reads_direction_resolution_and_size() -> None:
    agree = Comparison("X", 1.5, 1.2, (0.4, 2.0))
    assert (agree.agrees, agree.resolved, agree.size, agree.ratio) == (True, True, "consistent", pytest.approx(0.8))
    smaller = Comparison("X", 3.0, 0.5, (-0.5, 1.5))
    assert (smaller.agrees, smaller.resolved, smaller.size) == (True, False, "smaller")
    opposite = Comparison("X", 1.0, -2.0, (-3.0, -1.1))
    assert (opposite.agrees, opposite.resolved, opposite.size) == (False, True, "smaller")
    assert Comparison("X", 1.0, None, None).record() == {"paper_top1_delta": "1", "direction_agrees": "",
                                                         "delta_resolved": "", "delta_ratio": "", "size_vs_paper": ""}


def _run(seed: int, top1: float) -> dict:
    return {"seed": seed, "status": "FINISHED", "best_top1": top1, "top1": top1, "top5": top1 + 20}


def test_the_proxy_report_is_labelled_a_proxy_and_sets_each_delta_beside_the_papers(tmp_path: Path) -> None:
    measured = {"resnet18": ((50.0, 52.0), (51.0, 53.2)), "mobilenetv2_050": ((40.0, 41.0), (44.0, 45.1)),
                "deit_tiny_050": ((30.0, 31.0), (29.0, 29.9))}  # gMLP has no results yet
    rows = []
    for paper in paper_rows(TABLES["proxy"]):
        if paper["key"] in measured:
            tops = measured[paper["key"]][paper["head"] == "noah"]
            rows.append({"row": int(paper["row"]), "name": f"{paper['key']}_{paper['head']}",
                         "backbone": paper["key"], "head": {"kind": paper["head"]},
                         "runs": [_run(s, t) for s, t in enumerate(tops)]})
    meta = {"profile": "proxy", "dataset": "imagenet100", "num_classes": 100, "img_size": 160, "epochs": 50,
            "seeds": [0, 1]}
    (tmp_path / "proxy.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    build_table(TABLES["proxy"], tmp_path, tmp_path)
    text = (tmp_path / "proxy.md").read_text()
    assert text.startswith("# Proxy: ") and "**A proxy, not a reproduction.**" in text and "`proxy` profile" in text
    assert "| ResNet18 | +1.10 [−0.17, +2.37] | +1.56 | yes | no | 0.71× | consistent |" in text
    assert "| MobileNetV2 (0.5×) | +4.05 [+3.41, +4.69] | +3.14 | yes | yes | 1.29× | larger |" in text
    assert "| DeiT-Tiny (0.5×) | −1.05 [−1.69, −0.41] | +5.30 | no | yes | −0.20× | smaller |" in text
    assert "| gMLP-Tiny (0.5×) | — | +1.90 | — | — | — | — |" in text
    with open(tmp_path / "proxy.csv", newline="") as f:
        records = list(csv.DictReader(f))
    assert set(COLUMNS) <= set(records[0])
    noah = {r["key"]: r for r in records if r["head"] == "noah"}
    assert {k: round(float(r["paper_top1_delta"]), 2) for k, r in noah.items()} == PAPER_DELTAS
    assert [noah[k]["direction_agrees"] for k in PAPER_DELTAS] == ["true", "true", "false", ""]
    assert [noah[k]["delta_resolved"] for k in PAPER_DELTAS] == ["false", "true", "true", ""]
    assert all(r[c] == "" for r in records if r["head"] == "baseline" for c in COLUMNS)


# ---- end to end through the stages


def _checkout_copy(work: Path) -> Path:
    """The stages, package and params of this checkout in `work`: the stages write results/ and reports/ there."""
    work.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO_ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO_ROOT / name, work / name)
    return work


def _stage(work: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH", "DVC_ROOT")}
    return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_proxy_table_runs_end_to_end_and_its_report_compares_with_the_paper(tmp_path: Path) -> None:
    """ImageNet-100's path at toy scale: a class list picks 3 of 5 generated classes, `stages/prepare.py` prepares
    them, `stages/study.py proxy` trains the proxy table's 8 rows at 2 seeds at the proxy profile (whatever
    `profile:` says) for one epoch of 3 steps, and the report stage writes reports/proxy.md|csv."""
    work = _checkout_copy(tmp_path / "repo")
    src = _imagefolder(tmp_path / "src", train=8, val=2)
    (tmp_path / "classes.txt").write_text("n01000002\nn01000000\nn01000004\n")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["datasets"]["imagenet100"] = {"source": "imagefolder", "root": str(src),
                                         "classes": str(tmp_path / "classes.txt"), "out": "data/proxy/imagenet100",
                                         "resize": 40}
    params["profiles"]["proxy"].update(img_size=32, epochs=1, batch_size=8, seeds=[0, 1])
    params["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    params["ray"].update(num_cpus=2, max_concurrent=2, storage_path=str(tmp_path / "ray_results"))
    params["train"].update(checkpoint_root=str(tmp_path / "checkpoints"), progress="line")
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    for args in (["stages/prepare.py", "imagenet100"], ["stages/study.py", "proxy"], ["stages/report.py"]):
        proc = _stage(work, *args)
        assert proc.returncode == 0, f"{args}: {proc.stderr[-4000:]}"
    data = work / "data" / "proxy" / "imagenet100"
    assert json.loads((data / "classes.json").read_text()) == ["n01000002", "n01000000", "n01000004"]
    results = json.loads((work / "results" / "proxy.json").read_text())
    meta = results["meta"]
    assert (meta["profile"], meta["seeds"], meta["num_classes"]) == ("proxy", [0, 1], 3)
    assert [[run["status"] for run in row["runs"]] for row in results["rows"]] == [["FINISHED"] * 2] * 8
    text = (work / "reports" / "proxy.md").read_text()
    assert "**A proxy, not a reproduction.**" in text and "## NOAH's top-1 delta against the paper's" in text
    with open(work / "reports" / "proxy.csv", newline="") as f:
        noah = {r["key"]: r for r in csv.DictReader(f) if r["head"] == "noah"}
    assert {k: round(float(r["paper_top1_delta"]), 2) for k, r in noah.items()} == PAPER_DELTAS
    for record in noah.values():
        assert record["n"] == "2" and record["top1_delta_low"] and record["top1_delta_high"]
        assert record["direction_agrees"] in ("true", "false") and record["delta_resolved"] in ("true", "false")
        assert record["size_vs_paper"] in ("smaller", "consistent", "larger")


def test_a_speed_bench_train_measured_put_as_gpu_tflops_prices_a_trial_at_that_speed() -> None:
    """README: bench-train's `*_gpu_tflops` in a profile makes `plan` price the model at the measured images/s."""
    params = load_params().for_tables(["proxy"])
    trial = table_rows(params, "proxy")[3].trials["classify", 0]  # MobileNetV2 0.5x + NOAH
    tflops = equivalent_tflops(2500.0, trial.backbone, trial.head, trial.img_size)
    images = params.datasets["imagenet100"].train_images
    hours = trial_hours(trial, Measured(), params.datasets, tflops)
    assert hours == pytest.approx(trial.epochs * images / 2500.0 / 3600)
