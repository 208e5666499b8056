"""How a trial finds and scales its training recipe.

The recipes of the paper's appendix (A.1) are named entries under `recipes:` in params.yaml (values the
appendix leaves out come from the public code it cites, noted there), each in the paper's own units (its
epochs and batch). A trial that trains fewer epochs or a smaller batch keeps the recipe's shape: `scale`
maps every epoch count to the same fraction of the trial's epochs and the learning rate linearly with
the batch.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, RecipeConfig, parse


def get_recipe(recipe: str | RecipeConfig | Mapping[str, Any],
               recipes: Mapping[str, RecipeConfig | Mapping[str, Any]] | None = None) -> RecipeConfig:
    """A recipe by name from `recipes` (default: the repository's params.yaml), or parsed as given."""
    if isinstance(recipe, RecipeConfig):
        return recipe
    if isinstance(recipe, Mapping):
        return parse(RecipeConfig, dict(recipe), "recipe")
    if recipes is None:
        from .study import load_params

        recipes = load_params().recipes
    known = dict(recipes)
    if recipe not in known:
        raise ConfigError("recipe", recipe, "one of " + ", ".join(sorted(known)))
    found = known[recipe]
    found = found if isinstance(found, RecipeConfig) else parse(RecipeConfig, dict(found), f"recipes.{recipe}")
    return dataclasses.replace(found, name=recipe)


@dataclass(frozen=True)
class ScaledRecipe:
    """A recipe fitted to a trial's epochs and batch: what the optimizer and scheduler are built from."""

    recipe: RecipeConfig
    epochs: int
    batch_size: int
    lr: float
    warmup_epochs: float
    decay_epochs: float
    milestones: tuple[float, ...]


def scale(recipe: RecipeConfig, epochs: int | None = None, batch_size: int | None = None) -> ScaledRecipe:
    """Fit `recipe` to `epochs` and `batch_size` (None: the recipe's), keeping its shape."""
    epochs = epochs or recipe.epochs
    batch_size = batch_size or recipe.batch_size
    share = epochs / recipe.epochs
    return ScaledRecipe(
        recipe=recipe, epochs=epochs, batch_size=batch_size,
        lr=recipe.lr * batch_size / recipe.batch_size,
        warmup_epochs=recipe.warmup_epochs * share,
        decay_epochs=recipe.decay_epochs * share,
        milestones=tuple(m * share for m in recipe.milestones),
    )
