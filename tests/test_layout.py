"""The package layout holds: layers import only downward (import-linter), no import cycles, imports at the top
of modules, ruff clean, and every DVC stage depends on all the code it runs (statically and in `dvc status`) and on
exactly the params that change its outs (in `dvc status`)."""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipeline"
LAZY_ALLOWED = ("ray", "matplotlib")
"""The only imports written inside functions: heavy optional dependencies, imported on the paths that use them."""


def _run(*cmd: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_layers_import_only_downward() -> None:
    proc = _run(str(Path(sys.executable).with_name("lint-imports")), "pyproject.toml", "--no-cache")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_no_import_cycles() -> None:
    graph = grimp.build_graph("pipeline", cache_dir=None)
    cycles = [f"{a} -> {b} -> … -> {a}" for a in sorted(graph.modules)
              for b in sorted(graph.find_modules_directly_imported_by(a))
              if graph.chain_exists(importer=b, imported=a)]
    assert not cycles, "\n".join(cycles)


def test_imports_at_the_top_of_modules() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for func in ast.walk(ast.parse(path.read_text())):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = ["." * node.level + (node.module or "")]
                else:
                    continue
                found += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] not in LAZY_ALLOWED]
    assert not found, "imports inside functions:\n" + "\n".join(found)


def test_ruff_is_clean() -> None:
    proc = _run(str(Path(sys.executable).with_name("ruff")), "check", "--no-cache", "pipeline", "stages", "tests")
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- DVC stage dependencies


def _module_file(name: str) -> Path | None:
    """The file of module `pipeline.…` (a package's __init__.py) or of a stage script's sibling module
    (`stages/workspace.py`), None when it is not one of ours."""
    if (REPO / "stages" / f"{name}.py").is_file():
        return REPO / "stages" / f"{name}.py"
    if name != "pipeline" and not name.startswith("pipeline."):
        return None
    base = REPO.joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _imports(path: Path) -> set[str]:
    """Every module `path` imports anywhere in it (a package's `from . import sub` names the submodule too)."""
    package = ".".join(path.relative_to(REPO).parent.parts)  # what `from . import` means in this file
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def import_closure(script: Path) -> set[Path]:
    """The files of our package that running `script` can import: followed transitively, with the parent
    packages' __init__.py that Python runs first."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        for name in _imports(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                found = _module_file(".".join(parts[:i]))
                if found is not None and found not in seen:
                    seen.add(found)
                    todo.append(found)
    return seen


def _stages() -> dict[str, dict]:
    """dvc.yaml's stages with `foreach` expanded (as `name@item`) and `${profile}` filled in."""
    profile = yaml.safe_load((REPO / "params.yaml").read_text())["profile"]
    out = {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        items = stage.get("foreach", [None])
        for item in items:
            body = stage.get("do", stage)
            text = yaml.safe_dump(body).replace("${profile}", profile)
            out[name if item is None else f"{name}@{item}"] = yaml.safe_load(text.replace("${item}", str(item)))
    return out


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO).as_posix()
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_every_module_a_stage_imports_is_one_of_its_deps(stage: str) -> None:
    body = _stages()[stage]
    script = REPO / body["cmd"].split()[1]
    closure = import_closure(script)
    assert len(closure) > 5, f"{stage}: the import walk found only {closure}"
    missing = sorted(p.relative_to(REPO).as_posix() for p in closure if not _covered(p, body["deps"]))
    assert not missing, f"{stage} imports modules its dvc.yaml deps do not cover: {missing}"
    if any(p.is_relative_to(PACKAGE / "paper") for p in closure):
        assert "pipeline/paper" in body["deps"], f"{stage} reads the paper's CSVs"


def _dvc(cwd: Path, *args: str) -> str:
    proc = _run(str(Path(sys.executable).with_name("dvc")), *args, cwd=cwd)
    assert proc.returncode == 0, f"dvc {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


CHANGED = ("pipeline/config/schema.py", "pipeline/utils/io.py", "pipeline/paper/__init__.py",
           "pipeline/data/prepared.py", "pipeline/training/tracking.py", "pipeline/bench/timing.py",
           "stages/workspace.py")
"""Modules changed one at a time: several stages reach each only through other modules."""


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the repository's stages, code and params with every stage's lock recorded as is: outs (and the
    data dep) stand in as small files, so `dvc status` tells what an edit would re-run, without running it."""
    work = tmp_path_factory.mktemp("dvc") / "repo"
    work.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, work / name)
    for folder in ("pipeline", "stages"):
        shutil.copytree(REPO / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    stages = _stages()
    for body in stages.values():  # only the code and params matter here
        outs = [*body.get("outs", []), *body.get("metrics", []), *body.get("plots", [])]
        for out in [*outs, *[d for d in body["deps"] if d.startswith(("data/", "results/"))]]:
            target = work / (next(iter(out)) if isinstance(out, dict) else out)
            if target.exists():
                continue
            if target.suffix:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text("{}\n")
            else:
                target.mkdir(parents=True)
                (target / "stand-in").write_text("x\n")
    _dvc(work, "init", "--no-scm", "-q")
    _dvc(work, "commit", "-f", "-q", *stages)
    assert "up to date" in _dvc(work, "status")
    return work


@pytest.mark.slow
def test_changing_a_module_a_stage_imports_makes_dvc_report_it_changed(stand_in: Path) -> None:
    """In the stand-in repository, each of CHANGED is edited in turn: `dvc status` must report every stage that
    imports it (a dependency missed in dvc.yaml would not), and no stage whose deps do not hold it."""
    work, stages = stand_in, _stages()
    closures = {stage: import_closure(REPO / body["cmd"].split()[1]) for stage, body in stages.items()}
    for rel in CHANGED:
        expected = {stage for stage, files in closures.items() if REPO / rel in files}
        assert expected, f"no stage imports {rel}"
        target = work / rel
        original = target.read_text()
        target.write_text(original + "\n# changed\n")
        status = _dvc(work, "status")
        reported = {stage for stage in stages if f"\n{stage}:" in f"\n{status}"}
        assert expected <= reported, f"after changing {rel}: dvc status reported {sorted(reported)}, " \
                                     f"the stages importing it are {sorted(expected)}\n{status}"
        depending = {stage for stage, body in stages.items() if _covered(REPO / rel, body["deps"])}
        assert reported == depending, f"after changing {rel}: dvc status reported {sorted(reported)}, " \
                                      f"the stages whose deps hold it are {sorted(depending)}"
        target.write_text(original)


DISPLAY_ONLY = {"train.progress": "off", "profiles.imagenet.gpu_tflops": 12.5, "profiles.smoke.gpu_tflops": 1.0,
                "profiles.imagenet.epochs": 3, "train.num_workers": 2, "train.use_gpu": False,
                "train.loader_workers": 0, "train.decode": "cpu", "train.deterministic": True,
                "train.compile": True,
                "mlflow.log_weights": True, "ray.address": "auto", "ray.max_concurrent": 1, "ray.verbose": 2,
                "ray.reuse_actors": False, "profiles.proxy.epochs": 3, "profiles.proxy.seeds": [0],
                "tables.proxy.recipe": "aggressive", "tables.table1.recipe": "aggressive"}
"""Params that change how or where trials run (or another profile), never a stage's outs: dvc.yaml's header."""
RESULTING = {"profile": ("imagenet", {"prepare", "study"}), "datasets.builtin.resize": (96, {"prepare"}),
             "profiles.smoke.epochs": (4, {"study"}), "profiles.smoke.reid_img_size": (96, {"study"}),
             "profiles.smoke.resnet_width": (1.0, {"study"}),
             "seeds": ([0, 1, 2], {"study"}), "profiles.smoke.seeds": ([0, 1, 2], {"study"}),
             "profiles.smoke.recipes": ({}, {"study"}),
             "recipes.resnet.lr": (0.2, {"study"}),
             "tables.table6.recipe": ("aggressive", {"study"}), "study.tables": (["table4"], {"study"}),
             "benchmark.cpu_seconds": (1, {"benchmark"}),
             "mlflow.tracking_uri": ("sqlite:///other.db", {"study", "report"}),
             "train.checkpoint_root": ("elsewhere", {"report"})}
"""Params that change outs, with the stages whose outs they change."""


def test_every_profile_states_every_key_the_study_depends_on() -> None:
    """`dvc repro` fails a stage whose params name a key missing from params.yaml: a profile states even its nulls."""
    study = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["study"]
    keys = {p.removeprefix("profiles.${profile}.") for p in study["params"] if p.startswith("profiles.${profile}.")}
    assert keys
    for name, profile in yaml.safe_load((REPO / "params.yaml").read_text())["profiles"].items():
        assert keys <= set(profile), f"profiles.{name} lacks {sorted(keys - set(profile))}"


def _reported_after(work: Path, key: str, value: object) -> set[str]:
    """The stages `dvc status` reports changed once params.yaml's dotted `key` is `value` (then restored)."""
    path = work / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    *parents, last = key.split(".")
    section = params
    for name in parents:
        section = section[name]
    section[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        return set(json.loads(_dvc(work, "status", "--json")))
    finally:
        path.write_text(original)


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(DISPLAY_ONLY))
def test_display_only_params_leave_the_study_unchanged(stand_in: Path, key: str) -> None:
    assert _reported_after(stand_in, key, DISPLAY_ONLY[key]) == set()


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(RESULTING))
def test_params_that_change_outs_rerun_exactly_their_stages(stand_in: Path, key: str) -> None:
    value, stages = RESULTING[key]
    assert _reported_after(stand_in, key, value) == stages
