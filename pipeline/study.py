"""The study: params.yaml resolved into the trials of each paper table, validated before anything runs.

Every stage starts here, so a bad `params.yaml` (unknown key, wrong type, unknown backbone, impossible
N or r) fails in a second with one message naming the key, before Ray, MLflow or any data is touched.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from . import REPO_ROOT
from .config import (ConfigError, HeadConfig, Params, PrepareConfig, RecipeConfig, TableRow, TrialConfig,
                     parse, to_dict)
from .interrupt import Interrupted, interruptible

PARAMS = REPO_ROOT / "params.yaml"
RESULTS = REPO_ROOT / "results"
REPORTS = REPO_ROOT / "reports"


MAX_YAML_VALUES = 100_000
"""Values a params file may hold once its aliases are expanded (the repository's holds a few thousand)."""


class _BoundedLoader(yaml.SafeLoader):
    """Safe YAML whose aliases (`*name`) may not expand past MAX_YAML_VALUES values: nine nested aliases of
    nine uses each (a "billion laughs" file) would otherwise hang validation and fill the memory."""

    def construct_document(self, node: yaml.Node) -> Any:
        if _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise yaml.constructor.ConstructorError(
                None, None, f"more than {MAX_YAML_VALUES} values once its aliases (*name) are expanded", node.start_mark)
        return super().construct_document(node)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Values under `node` with every alias expanded, each shared node measured once."""
    if id(node) not in sizes:
        sizes[id(node)] = 0  # a recursive alias adds nothing more
        children = (node.value if isinstance(node, yaml.SequenceNode) else
                    [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def load_params(path: str | Path = PARAMS) -> Params:
    """Parse and cross-check a params file (structure only; `table_rows` builds the models)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("params", str(path), "an existing params.yaml")
    try:
        data = yaml.load(path.read_text(), Loader=_BoundedLoader)
    except yaml.YAMLError as err:
        raise ConfigError("params", str(path), f"valid YAML of at most {MAX_YAML_VALUES} values ({err})") from None
    return parse(Params, data)


@dataclass(frozen=True)
class RowTrials:
    """One printed table row and the trials that fill it (`classify`, or `scratch` and `finetune`)."""

    table: str
    row: TableRow
    trials: dict[str, TrialConfig]


def data_dir(params: Params, name: str) -> str:
    """The folder of dataset `name` (a relative `out` is taken from the repository root)."""
    out = Path(params.datasets[name].out)
    return str(out if out.is_absolute() else REPO_ROOT / out)


@functools.lru_cache(maxsize=None)
def _checked_head(backbone: str, head: HeadConfig, img_size: int) -> HeadConfig:
    """The head with N and r resolved, after building the model on the meta device (no memory, no time);
    cached, since tables repeat the same rows."""
    import torch

    from .models import build_model, resolve_head

    head = resolve_head(backbone, head)
    with torch.device("meta"):
        build_model(backbone, head, num_classes=10, img_size=img_size)
    return head


def table_rows(params: Params, table: str) -> list[RowTrials]:
    """The trials of every row of `table` at the active profile, every head validated."""
    if table not in params.tables:
        raise ConfigError("table", table, "a key of `tables`: " + ", ".join(params.tables))
    spec, prof = params.tables[table], params.active
    reid = spec.task == "reid"
    if reid and prof.reid_dataset is None:
        raise ConfigError(f"profiles.{params.profile}.reid_dataset", None, f"a dataset for {table} (a reid table)")
    img_size = (prof.reid_img_size or prof.img_size) if reid else prof.img_size
    rows = []
    for i, row in enumerate(spec.rows):
        where = f"tables.{table}.rows[{i}]"
        try:
            head = _checked_head(row.backbone, row.head, img_size)
        except ConfigError as err:
            raise err.under(where) from None
        classify = TrialConfig(backbone=row.backbone, data_dir=data_dir(params, prof.dataset), head=head,
                               recipe=_recipe(params, spec.pretrain_recipe if reid else spec.recipe),
                               seed=params.seed, img_size=prof.img_size, epochs=prof.epochs,
                               batch_size=prof.batch_size)
        if not reid:
            trials = {"classify": classify}
        else:
            scratch = dataclasses.replace(classify, data_dir=data_dir(params, prof.reid_dataset),
                                          recipe=_recipe(params, spec.recipe), img_size=img_size)
            trials = {"scratch": scratch, "finetune": dataclasses.replace(
                scratch, recipe=_recipe(params, spec.finetune_recipe), init_from=classify)}
        rows.append(RowTrials(table, dataclasses.replace(row, head=head), trials))
    return rows


def _recipe(params: Params, name: str | None) -> RecipeConfig:
    """A recipe of params.yaml, carrying its key as its name (names label runs; they are not hashed)."""
    assert name is not None  # Params checked that every table names its recipes
    return dataclasses.replace(params.recipes[name], name=name)


def trial_key(trial: TrialConfig) -> str:
    """The trial identity hash once the data is prepared; before that, a hash of the resolved config
    with the dataset's folder standing in for its manifest (what `plan` counts)."""
    from .data.prepare import MANIFEST
    from .train import trial_id

    if (Path(trial.data_dir) / MANIFEST).is_file():
        return trial_id(trial)
    text = json.dumps(to_dict(trial), sort_keys=True, default=str)
    return "unprepared-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def profile_datasets(params: Params, names: list[str] | None = None) -> dict[str, PrepareConfig]:
    """The `datasets:` entries to prepare: `names`, or the active profile's `dataset` and `reid_dataset`."""
    names = names or [n for n in (params.active.dataset, params.active.reid_dataset) if n]
    for name in names:
        if name not in params.datasets:
            raise ConfigError("datasets", name, "a key of `datasets`: " + ", ".join(params.datasets))
    return {n: params.datasets[n] for n in names}


def prepare_stage(params: Params, names: list[str]) -> None:
    """The DVC stage `prepare`: the active profile's datasets, or those named."""
    from .data.prepare import prepare

    for name, cfg in profile_datasets(params, names).items():
        try:
            prepare(cfg)
        except ConfigError as err:
            raise err.under(f"datasets.{name}") from None


class StageError(RuntimeError):
    """A stage ran but could not produce its outputs (e.g. trials that failed): exit 1 with the cause."""


def run_stage(body: Callable[[Params, list[str]], Any], argv: list[str]) -> int:
    """A DVC stage's whole `main`: `[--params FILE] [ARGS…]`, the params validated first; a bad option
    ends the stage with exit code 2 and one line naming it, before any work starts; outputs it could not
    produce end it with exit code 1 and one line saying why."""
    import argparse
    import sys

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
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:
        print(f"error: interrupted by {err}; run the stage again to resume", file=sys.stderr)
        return 128 + err.signum
    return 0
