"""A trial's training recipe: looked up by name, fitted to the trial's epochs and batch, and turned into
timm's optimizer, scheduler, Mixup/CutMix and loss.

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

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from ..config import ConfigError, RecipeConfig, parse

UNAPPLIED = ("layer_scale",)
"""Recipe options the backbones have no parameter for (ConvNeXt's layer scale has no counterpart in a
ResNet): recorded on the run as the `recipe_not_applied` tag instead of being silently dropped."""


def get_recipe(recipe: str | RecipeConfig | Mapping[str, Any],
               recipes: Mapping[str, RecipeConfig | Mapping[str, Any]]) -> RecipeConfig:
    """A recipe by name from `recipes` (params.yaml's `recipes:`), carrying its name, or parsed as given."""
    if isinstance(recipe, RecipeConfig):
        return recipe
    if isinstance(recipe, Mapping):
        return parse(RecipeConfig, dict(recipe), "recipe")
    known = dict(recipes)
    if recipe not in known:
        raise ConfigError("recipe", recipe, "one of " + ", ".join(sorted(known)))
    found = known[recipe]
    found = found if isinstance(found, RecipeConfig) else parse(RecipeConfig, dict(found), f"recipes.{recipe}")
    return dataclasses.replace(found, name=recipe)


def unapplied(recipe: RecipeConfig) -> list[str]:
    """The options of `recipe` that are set but that no backbone here can take (see UNAPPLIED)."""
    return [k for k in UNAPPLIED if getattr(recipe, k)]


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


def build_optimizer(model: nn.Module, scaled: ScaledRecipe) -> torch.optim.Optimizer:
    """timm's optimizer for the recipe. Norms, biases and the model's `no_weight_decay()` (NOAH's biases, a
    ViT's tokens) skip weight decay only where the recipe says so: timm honours `no_weight_decay()` whenever it
    is given the model, but the authors decay every parameter in the commands without `--nowd-bn` (`main.py`
    L142-144), so those recipes hand timm the bare parameters."""
    r = scaled.recipe
    opt, extra = {"sgd": ("momentum", {}), "adamw": ("adamw", {}), "amsgrad": ("adam", {"amsgrad": True})}[r.optimizer]
    if opt != "momentum":
        extra.update(betas=(r.momentum, 0.999), eps=r.opt_eps)
    params = model if r.no_decay_norm_bias else [p for p in model.parameters() if p.requires_grad]
    return create_optimizer_v2(params, opt=opt, lr=scaled.lr, weight_decay=r.weight_decay,
                               momentum=r.momentum, filter_bias_and_bn=r.no_decay_norm_bias, **extra)


def build_scheduler(optimizer: torch.optim.Optimizer, scaled: ScaledRecipe, updates_per_epoch: int) -> Any:
    """timm's scheduler: linear warm-up, then the recipe's decay over the rest, its lr set every update or, with
    `lr_step: epoch`, once at the start of each epoch (the training loop calls both `step_update` and `step`;
    timm's scheduler acts on the one it was made for)."""
    r = scaled.recipe
    warmup = scaled.warmup_epochs
    sched = {"linear": "poly", "step": "step", "multistep": "multistep", "cosine": "cosine"}[r.schedule]
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=scaled.epochs - warmup, warmup_epochs=warmup, warmup_prefix=True,
        warmup_lr=r.warmup_lr, min_lr=r.min_lr, decay_epochs=scaled.decay_epochs,
        decay_milestones=[m - warmup for m in scaled.milestones],
        decay_rate=1.0 if r.schedule == "linear" else r.decay_rate,
        step_on_epochs=r.lr_step == "epoch", updates_per_epoch=updates_per_epoch)
    return scheduler


def build_mixup(recipe: RecipeConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix (with label smoothing folded into its soft targets), or None when off."""
    if recipe.mixup <= 0 and recipe.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=recipe.mixup_prob,
                 switch_prob=recipe.mixup_switch_prob, label_smoothing=recipe.label_smoothing,
                 num_classes=num_classes)


def build_criterion(recipe: RecipeConfig, mixup: Mixup | None) -> nn.Module:
    """Soft-target cross-entropy under Mixup/CutMix, else cross-entropy with the recipe's label smoothing."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
