"""A trial and its identity.

`TrialConfig` (pipeline.config) is a trial as params.yaml or the command line states it; `resolve_trial`
turns it, once, into a `Trial`: the recipe looked up, the head's N, r and dropout filled in from the backbone's
defaults, the epochs and batch the recipe is fitted to. A trial's identity hash covers everything that determines its
result (its data by the manifest's hash, not its folder), so equal trials of different tables train once.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import HeadConfig, RecipeConfig, TrialConfig, parse, to_dict
from ..data.prepared import is_prepared, manifest_hash
from ..models import resolve_head
from .recipes import ScaledRecipe, get_recipe, scale

TRAINING_CODE_VERSION = 6
"""Part of every trial identity. Bump it only when a change to the training code changes results
(so finished runs are no longer reused); refactors that keep results leave it alone."""


@dataclass(frozen=True)
class Trial:
    """A resolved trial: what trains and what is hashed. Its plain form (`to_dict`) parses back as a
    `TrialConfig` that resolves to an equal `Trial` (how it travels to Ray Tune trials)."""

    backbone: str
    data_dir: str
    head: HeadConfig
    recipe: RecipeConfig
    seed: int
    img_size: int
    epochs: int
    batch_size: int
    width: float = 1.0
    """The backbone's channel widths times this (`ProfileConfig.width`)."""
    init_from: Trial | None = None
    """The classification trial whose checkpoint initialises the backbone (Table 9's fine-tuning)."""

    @property
    def scaled(self) -> ScaledRecipe:
        """The recipe fitted to this trial's epochs and batch."""
        return scale(self.recipe, self.epochs, self.batch_size)

    @property
    def label(self) -> str:
        """`resnet18 noah(N=4,r=0.5) resnet seed 0` (`resnet18 width 0.5 ...` for a narrower one): the MLflow run
        name."""
        width = "" if self.width == 1 else f" width {self.width:g}"
        return f"{self.backbone}{width} {self.head.name} {self.recipe.name} seed {self.seed}"


def resolve_trial(trial: Trial | TrialConfig | Mapping[str, Any],
                  recipes: Mapping[str, RecipeConfig | Mapping[str, Any]]) -> Trial:
    """The `Trial` a spec describes, with recipe names looked up in `recipes` (params.yaml's `recipes:`)."""
    if isinstance(trial, Trial):
        return trial
    spec = parse(TrialConfig, dict(trial) if isinstance(trial, Mapping) else trial, "trial")
    recipe = get_recipe(spec.recipe, recipes)
    scaled = scale(recipe, spec.epochs, spec.batch_size)
    return Trial(backbone=spec.backbone, data_dir=spec.data_dir, head=resolve_head(spec.backbone, spec.head),
                 recipe=recipe, seed=spec.seed, img_size=spec.img_size, epochs=scaled.epochs,
                 batch_size=scaled.batch_size, width=spec.width,
                 init_from=resolve_trial(spec.init_from, recipes) if spec.init_from is not None else None)


def identity(trial: Trial) -> dict[str, Any]:
    """Everything that determines a trial's result, as plain data (a width only when narrowed, so the paper's
    networks keep the identities they had before widths could change)."""
    recipe = to_dict(trial.recipe)
    recipe.pop("name")
    return {"backbone": trial.backbone, "head": to_dict(trial.head), "recipe": recipe,
            "data": manifest_hash(trial.data_dir), "seed": trial.seed, "img_size": trial.img_size,
            "epochs": trial.epochs, "batch_size": trial.batch_size, "code": TRAINING_CODE_VERSION,
            **({"width": trial.width} if trial.width != 1 else {}),
            **({"init_from": trial_id(trial.init_from)} if trial.init_from is not None else {})}


def trial_id(trial: Trial) -> str:
    """The trial identity hash: equal for trials that must give the same result, whatever table asks (bit
    for bit on the same kind of machine, `utils.machine`)."""
    return _digest(identity(trial))


def trial_key(trial: Trial) -> str:
    """The identity hash once the trial's data is prepared; before that (what `plan` counts), a hash of the
    trial with its data folder standing in for the manifest, marked `unprepared-`."""
    if is_prepared(trial.data_dir):
        return trial_id(trial)
    return "unprepared-" + _digest(to_dict(trial))


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
