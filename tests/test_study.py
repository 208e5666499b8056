"""params.yaml: the repository's file resolves into every paper row, and each kind of bad input fails
at once with one message naming the key, before Ray, MLflow or data are touched."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import apply_overrides

from pipeline import REPO_ROOT
from pipeline.config import PARAMS, ConfigError, StudyConfig, load_params, profile_datasets
from pipeline.report.specs import TABLES, paper_rows
from pipeline.study.rows import table_rows

TRAINED = [name for name, spec in TABLES.items() if spec.producer == "study"]


@pytest.mark.slow
def test_repository_params_cover_every_paper_row() -> None:
    params = load_params()
    assert set(params.tables) == set(TRAINED)
    for table in TRAINED:
        paper = paper_rows(TABLES[table])
        rows = table_rows(params.for_tables([table]), table)  # the proxy's at its own profile
        # every paper row, in its order; rows the paper does not print (another backbone) may follow
        assert [rt.row.row for rt in rows][:len(paper)] == [int(p["row"]) for p in paper], table
        assert all(rt.row.row > len(paper) for rt in rows[len(paper):]), table
        for rt, p in zip(rows, paper):
            assert rt.row.backbone == p["key"]
            assert (rt.row.head.kind == "noah") == (p["head"] == "noah")
            if p.get("N"):
                assert (rt.row.head.N, rt.row.head.r) == (int(p["N"]), float(p["r"])), (table, p["row"])
            for option in ("feature_split", "softmax_axis", "aggregation"):
                if p.get(option):
                    assert getattr(rt.row.head, option) == p[option], (table, p["row"])


@pytest.mark.slow
def test_dvc_set_param_addresses_every_row_by_its_name(tmp_path: Path) -> None:
    """`dvc exp run -S` (DVC's Hydra overrides) sets one option of any row of the repository's tables by name,
    an option the row states (`=`) or leaves to its default (`++`), and touches no other row."""
    path = tmp_path / "params.yaml"
    shutil.copy(PARAMS, path)
    before = load_params(path)
    names = [(table, name) for table, spec in before.tables.items() for name in spec.rows]
    apply_overrides(path, [f"++tables.{t}.rows.{n}.head.dropout=0.05" for t, n in names] +
                    ["tables.table7.rows.max.head.aggregation=avg", "tables.table4.rows.n2.head.N=1"])
    after = load_params(path)
    for table, name in names:
        old, new = before.tables[table].rows[name], after.tables[table].rows[name]
        assert new.head.dropout == 0.05 and (new.row, new.backbone, new.name) == (old.row, old.backbone, name)
    assert after.tables["table7"].rows["max"].head.aggregation == "avg"
    assert after.tables["table4"].rows["n2"].head.N == 1
    assert after.tables["table7"].rows["sum"].head.aggregation == "sum"


def test_the_study_stage_params_name_exactly_the_tables_of_study_tables() -> None:
    """`dvc repro` trains `study.tables` (the stage's command names none), each a param of the study stage, whose
    out is one folder; they must agree."""
    stage = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["study"]
    tables = list(load_params().study.tables)
    assert stage["cmd"] == "python stages/study.py"
    assert set(tables) <= set(TRAINED)  # every table `dvc repro` trains has its report
    assert [p.removeprefix("tables.") for p in stage["params"] if p.startswith("tables.")] == tables
    assert "study.tables" in stage["params"] and stage["outs"] == ["results/study"]


def test_the_study_stage_with_no_table_named_and_no_study_tables_names_the_key() -> None:
    from pipeline.study.sweep import study_stage

    params = dataclasses.replace(load_params(), study=StudyConfig())
    with pytest.raises(ConfigError, match=r"^study\.tables: got \[\]; allowed: one or more keys of `tables`"):
        study_stage(params, [])


def test_study_tables_are_tables_each_named_once(tmp_path: Path) -> None:
    for tables, key in ((["table4", "nope"], "study.tables[1]"), (["table4", "table5", "table4"], "study.tables[2]")):
        data = yaml.safe_load(PARAMS.read_text())
        data["study"]["tables"] = tables
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError, match=f"^{re.escape(key)}: got"):
            load_params(tmp_path / "p.yaml")


def test_prepare_builds_the_active_profiles_datasets_or_those_named() -> None:
    params = load_params()
    assert list(profile_datasets(params)) == ["builtin", "builtin_reid"]
    assert profile_datasets(params, ["imagenet"])["imagenet"].source == "imagefolder"
    with pytest.raises(ConfigError, match="datasets: got 'nope'"):
        profile_datasets(params, ["nope"])


def test_reid_table_trains_each_row_twice() -> None:
    params = load_params()
    rows = table_rows(params, "table9")
    assert [sorted(rt.trials) for rt in rows] == [sorted((kind, s) for kind in ("finetune", "scratch")
                                                         for s in params.seeds)] * 2


def test_a_profile_narrows_its_resnets_alone() -> None:
    """`resnet_width` reaches every ResNet trial (and its fine-tuning source) and no other family's."""
    params = load_params()
    width = params.profiles["smoke"].resnet_width
    assert width < 1
    assert {t.width for rt in table_rows(params, "table5") for t in rt.trials.values()} == {width}
    assert {t.init_from.width for rt in table_rows(params, "table9") for t in rt.trials.values() if t.init_from}
    assert {t.width for rt in table_rows(params, "table2") for t in rt.trials.values()} == {1.0}


BAD = [
    ({"tablez": {}}, "tablez", "a known key"),
    ({"seeds": "zero"}, "seeds", "a non-empty list of distinct integers"),
    ({"seeds": [0, 0]}, "seeds", "distinct"),
    ({"seeds": []}, "seeds", "a non-empty list"),
    ({"seed": 0}, "seed", "`seeds:`, a list"),
    ({"profile": "huge"}, "profile", "a key of `profiles`"),
    ({"tables": {"table6": {"rows": {"spatial": {"head": {"N": 3}}}}}},
     "tables.table6.rows.spatial.head.N", "a divisor of the 256 feature channels"),  # ResNet18 at half width
    ({"tables": {"table6": {"rows": {"spatial": {"head": {"r": 0.001}}}}}},
     "tables.table6.rows.spatial.head.r", "key channels"),
    ({"tables": {"table6": {"rows": {"baseline": {"backbone": "resnet19"}}}}},
     "tables.table6.rows.baseline.backbone", "resnet18"),
    ({"tables": {"table6": {"rows": {"channel": {"head": {"axis": 1}}}}}},
     "tables.table6.rows.channel.head.axis", "a known key"),
    ({"tables": {"table6": {"rows": {"Spatial": {"row": 2, "backbone": "resnet18"}}}}},
     "tables.table6.rows.Spatial", "lowercase letters, digits and underscores"),
    ({"tables": {"table6": {"rows": [{"row": 1, "backbone": "resnet18", "head": {"kind": "baseline"}}]}}},
     "tables.table6.rows", "a non-empty mapping of row name to row, e.g. `rows: {baseline: {row: 1"),
    ({"tables": {"table6": {"recipe": "fast"}}}, "tables.table6.recipe", "a key of `recipes`"),
    ({"datasets": {"builtin": {"source": "imagefolder", "out": "data/smoke/builtin"}}}, "datasets.builtin.root",
     "a folder path"),
]


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for k, v in changes.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


@pytest.mark.parametrize("changes,key,allowed", BAD, ids=[b[1] for b in BAD])
def test_bad_params_name_the_key(tmp_path: Path, changes: dict, key: str, allowed: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(_merge(yaml.safe_load(PARAMS.read_text()), changes)))
    with pytest.raises(ConfigError) as err:
        params = load_params(path)
        for table in params.tables:
            if params.tables[table].task == "classify":
                table_rows(params, table)
    assert err.value.key.startswith(key), str(err.value)
    assert allowed in str(err.value)


@pytest.mark.slow
def test_study_stage_rejects_bad_params_before_ray_starts(tmp_path: Path) -> None:
    """The stage exits 2 with one line naming the key, in seconds, and starts no Ray or MLflow."""
    params = yaml.safe_load(PARAMS.read_text())
    params["tables"]["table6"]["rows"]["spatial"]["head"]["N"] = 5
    params["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "stages/study.py", "--params", str(path), "table6"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: tables.table6.rows.spatial.head.N: got 5; allowed: a divisor of the 256 feature channels, "
        "e.g. [1, 2, 4, 8, 16, 32, 64]"]
    assert not (tmp_path / "mlflow.db").exists()
    assert elapsed < 30, elapsed  # generous: shared CI machine; typically ~5 s, mostly imports


def _identities(params) -> dict[str, tuple[set, set]]:
    """Per trained table of params.yaml, in order, from params.yaml alone: the trials its rows need, as
    (recipe, backbone, resolved head, kind), and the classification trials Table 9's fine-tuning starts from."""
    from pipeline.config import to_dict
    from pipeline.models import resolve_head

    out = {}
    for name, spec in params.tables.items():
        if name == "proxy":  # trains at its own profile only
            continue
        own, sources = set(), set()
        for row in spec.rows.values():
            head = tuple(sorted(to_dict(resolve_head(row.backbone, row.head)).items()))
            if spec.task == "reid":
                own |= {(spec.recipe, row.backbone, head, "scratch"), (spec.finetune_recipe, row.backbone, head, "ft")}
                sources.add((spec.pretrain_recipe, row.backbone, head, "classify"))
            else:
                own.add((row.recipe or spec.recipe, row.backbone, head, "classify"))
        out[name] = (own, sources)
    return out


@pytest.mark.slow
def test_plan_counts_no_configuration_twice() -> None:
    out = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--profile", "imagenet", "--gpus", "64",
                          "--gpus-per-trial", "8", "--json"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    plan = json.loads(out)
    params = load_params()
    tables, seeds = plan["tables"], len(params.seeds)  # each row trains once per seed
    expected = _identities(params)
    assert set(tables) == {*expected, "table10"} and tables["table10"]["trials"] == 0
    # Tables 4-7 and 11 reuse Table 1's ResNet18/50/101 rows and each other's (Table 4 prints N=4, r=1/8
    # twice); Table 8's recipe differs; Table 9 fine-tunes Table 4's ResNet50s.
    seen: set = set()
    for name, (own, sources) in expected.items():
        rows = len(params.tables[name].rows)
        kinds = 2 if params.tables[name].task == "reid" else 1
        assert tables[name] == {**tables[name], "rows": rows, "trials": rows * kinds * seeds,
                                "unique_trials": len(own) * seeds, "new_unique_trials": len(own - seen) * seeds}, name
        seen |= own | sources
    assert tables["table4"]["unique_trials"] < tables["table4"]["trials"]  # the repeated row trains once
    everything = set().union(*(own for own, _ in expected.values()))
    assert plan["total"]["unique_trials"] == sum(t["new_unique_trials"] for t in tables.values()) \
        == len(everything) * seeds
    assert all(t["gpu_hours"] > 0 for name, t in tables.items() if name != "table10")
    # 8 trials at a time: a table alone takes at least its GPU-hours / 64. The whole study packed at once is
    # list scheduling, so it ends within one longest chain (no longer than the longest table alone) of that
    # bound (Graham), and beats one table after another and the tables' sum, which counts shared trials twice.
    spans = {name: t["makespan_hours"] for name, t in tables.items()}
    assert all(spans[n] >= tables[n]["gpu_hours"] / 64 - 0.01 for n in tables if tables[n]["finished"] == 0)
    total = plan["total"]
    bound = total["gpu_hours"] / 64
    assert bound - 0.01 <= total["makespan_hours"] <= bound + max(spans.values())
    assert total["makespan_hours"] < min(total["table_by_table_hours"], sum(spans.values()))


@pytest.mark.slow
def test_plan_counts_every_seed(tmp_path: Path) -> None:
    """Three seeds train every row three times: three times the trials and the GPU-hours."""
    from pipeline.study.plan import plan

    data = yaml.safe_load(PARAMS.read_text())
    data["profile"] = "imagenet"  # its datasets state their sizes: costs known before anything is prepared
    data["seeds"] = [0]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    one = plan(load_params(path))
    data["seeds"] = [0, 1, 2]
    path.write_text(yaml.safe_dump(data))
    three = plan(load_params(path))
    for name in ("table4", "table9", "table11"):
        assert three["tables"][name]["trials"] == 3 * one["tables"][name]["trials"]
        assert three["tables"][name]["unique_trials"] == 3 * one["tables"][name]["unique_trials"]
    assert three["total"]["gpu_hours"] == pytest.approx(3 * one["total"]["gpu_hours"], rel=1e-3)


@pytest.mark.slow
def test_plan_rejects_fewer_gpus_than_one_trial_needs() -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--gpus", "4", "--gpus-per-trial", "8"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --gpus: got 4.0; allowed: at least --gpus-per-trial (8)"), proc.stderr
