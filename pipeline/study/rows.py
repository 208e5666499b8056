"""The study's tables: params.yaml's `tables:` resolved into the trials of each printed row, validated
before anything runs.

Every stage validates its params first, so a bad `params.yaml` (unknown key, wrong type, unknown backbone,
impossible N or r) fails in a second with one message naming the key, before Ray, MLflow or any data is
touched.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from ..config import ConfigError, HeadConfig, Params, TableRow, data_dir
from ..models import build_model, narrows, resolve_head
from ..training.trial import Trial, resolve_trial, trial_key


@dataclass(frozen=True)
class RowTrials:
    """One printed table row and the trials that fill it: per seed (`Params.trial_seeds`), `classify`, or
    `scratch` and `finetune`, keyed `(kind, seed)`."""

    table: str
    row: TableRow
    trials: dict[tuple[str, int], Trial]


@functools.cache
def _checked_head(backbone: str, head: HeadConfig, img_size: int, width: float) -> HeadConfig:
    """The head with N and r resolved, after building the model on the meta device (no memory, no time);
    cached, since tables repeat the same rows."""
    head = resolve_head(backbone, head)
    with torch.device("meta"):
        build_model(backbone, head, num_classes=10, img_size=img_size, width=width)
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
    for row in spec.rows.values():
        where = f"tables.{table}.rows.{row.name}"
        width = prof.resnet_width if narrows(row.backbone) else 1.0
        try:
            head = _checked_head(row.backbone, row.head, img_size, width)
        except ConfigError as err:
            raise err.under(where) from None

        def trial(name: str, data: str, size: int, seed: int) -> Trial:
            return resolve_trial(
                {"backbone": row.backbone, "data_dir": data_dir(params.datasets[data].out), "head": head, "seed": seed,
                 "recipe": params.recipe(name), "img_size": size, "width": width, "epochs": prof.epochs,
                 "batch_size": prof.batch_size}, params.recipes)

        trials: dict[tuple[str, int], Trial] = {}
        for seed in params.trial_seeds:
            classify = trial(spec.pretrain_recipe if reid else row.recipe or spec.recipe, prof.dataset,
                             prof.img_size, seed)
            if not reid:
                trials["classify", seed] = classify
            else:
                finetune = trial(spec.finetune_recipe, prof.reid_dataset, img_size, seed)
                trials["scratch", seed] = trial(spec.recipe, prof.reid_dataset, img_size, seed)
                trials["finetune", seed] = dataclasses.replace(finetune, init_from=classify)
        rows.append(RowTrials(table, dataclasses.replace(row, head=head), trials))
    return rows


def departures(params: Params, trial: Trial, reid: bool) -> list[str]:
    """How `trial` departs from the paper's settings for its profile's budget: its epochs, batch, lr, image
    size and width against its recipe's and the `imagenet` profile's (the paper's), and each recipe field its
    profile sets (`profiles.<profile>.recipes`)."""
    recipe, paper, scaled = trial.recipe, params.recipes[trial.recipe.name], trial.scaled
    out = []
    if trial.epochs != paper.epochs:
        out.append(f"{trial.epochs} epochs of the recipe's {paper.epochs} (its schedule shrunk to them)")
    if trial.batch_size != paper.batch_size:
        out.append(f"batch {trial.batch_size} of {paper.batch_size}")
    linear = paper.lr * trial.batch_size / paper.batch_size
    if not math.isclose(scaled.lr, linear):
        out.append(f"lr {scaled.lr:g} (the paper's {paper.lr:g} at batch {paper.batch_size} scales to {linear:g})")
    elif trial.batch_size != paper.batch_size:
        out.append(f"lr {scaled.lr:g} (scaled linearly with the batch)")
    imagenet = params.profiles.get("imagenet")
    size = None if imagenet is None else (imagenet.reid_img_size or imagenet.img_size) if reid else imagenet.img_size
    if size is not None and trial.img_size != size:
        out.append(f"{trial.img_size} px of {size}")
    if trial.width != 1:
        out.append(f"the backbone at {trial.width:g} of the paper's channel widths")
    for key in sorted(params.active.recipes.get(recipe.name, {})):
        if key not in ("lr", "batch_size", "epochs"):
            out += _changed(key, getattr(recipe, key), getattr(paper, key))
    return out


def _changed(key: str, value: object, paper: object) -> list[str]:
    """`key value (the paper's value)` for a changed field; a nested section (`augment`) field by field."""
    if dataclasses.is_dataclass(value) and type(value) is type(paper):
        return [line for f in dataclasses.fields(value)
                for line in _changed(f"{key}.{f.name}", getattr(value, f.name), getattr(paper, f.name))]
    return [] if value == paper else [f"{key} {_shown(value)} (the paper's {_shown(paper)})"]


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


def table_order(name: str) -> tuple[int, int, str]:
    """The paper's order (`table4` before `table10`), then tables of other names alphabetically."""
    number = name.removeprefix("table")
    return (0, int(number), "") if number.isdigit() else (1, 0, name)


@dataclass
class StudyTrial:
    """A trial of the study: what it is, the tables and rows (`table:row`) that need it and how it ended
    (FINISHED, FAILED, or BLOCKED when the trial it starts from failed; PENDING until then)."""

    key: str
    trial: Trial
    tables: list[str]
    rows: list[str] = dataclasses.field(default_factory=list)
    after: str | None = None  # the identity of the trial it starts from, when that one is trained too
    status: str = "PENDING"
    reason: str = ""
    top1: float | None = None
    seconds: float | None = None
    ran: bool = False

    @property
    def label(self) -> str:
        return f"{self.trial.label} [{', '.join(self.tables)}]"


def study_trials(rows: dict[str, list[RowTrials]], finished: frozenset[str]) -> dict[str, StudyTrial]:
    """One `StudyTrial` per identity the tables' rows need, in the tables' order, with the classification
    trial a fine-tuning trial starts from; those in `finished` are FINISHED already."""
    out: dict[str, StudyTrial] = {}

    def add(trial: Trial, rt: RowTrials) -> str:
        key = trial_key(trial)
        st = out.setdefault(key, StudyTrial(key, trial, [], status="FINISHED" if key in finished else "PENDING"))
        row = f"{rt.table}:{rt.row.name}"
        if rt.table not in st.tables:
            st.tables.append(rt.table)
        if row not in st.rows:
            st.rows.append(row)
        return key

    for table_rows_ in rows.values():
        for rt in table_rows_:
            for trial in rt.trials.values():
                key = add(trial, rt)
                if trial.init_from is not None:
                    source = add(trial.init_from, rt)
                    out[key].after = source if out[source].status == "PENDING" else None
    return out
