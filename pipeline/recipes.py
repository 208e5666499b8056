"""The training recipes of the paper's appendix (A.1) as named data, and how a trial scales them.

Each recipe is written in the paper's own units (its epochs and batch). A trial that trains fewer epochs
or a smaller batch keeps the recipe's shape: `scale` maps every epoch count to the same fraction of the
trial's epochs and the learning rate linearly with the batch. Values the appendix leaves out come from
the public code the paper says it used (noted per recipe). `params.yaml` may redefine any recipe under
`recipes:`; the ones here are the defaults.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .config import AugmentConfig, ConfigError, RecipeConfig, parse

# RandAugment, Random Erasing and bicubic crops as in the DeiT, timm and ConvNeXt training scripts.
_STRONG_AUGMENT = AugmentConfig(kind="timm", auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.4,
                                reprob=0.25, interpolation="bicubic")

RECIPES: dict[str, RecipeConfig] = {
    # ResNets: SGD 0.1, x0.1 every 30 epochs, 100 epochs, batch 256, wd 1e-4, momentum 0.9.
    "resnet": RecipeConfig(name="resnet", optimizer="sgd", lr=0.1, batch_size=256, epochs=100,
                           weight_decay=1e-4, schedule="step", decay_epochs=30, decay_rate=0.1),
    # MobileNets: SGD 0.05, cosine to zero, 150 epochs, batch 256, wd 4e-5.
    "mobilenet": RecipeConfig(name="mobilenet", optimizer="sgd", lr=0.05, batch_size=256, epochs=150,
                              weight_decay=4e-5, schedule="cosine"),
    # ShuffleNetV2: SGD 0.5, linear to zero, 240 epochs, batch 1024, wd 4e-5 (the official code
    # exempts norms and biases from weight decay).
    "shufflenet": RecipeConfig(name="shufflenet", optimizer="sgd", lr=0.5, batch_size=1024, epochs=240,
                               weight_decay=4e-5, schedule="linear", no_decay_norm_bias=True),
    # DeiT and PVT: AdamW 5e-4, cosine to zero, 300 epochs, batch 1024, wd 0.05, label smoothing,
    # RandAugment, Random Erasing, Mixup, CutMix. Warm-up (5 epochs), Mixup/CutMix alphas, stochastic
    # depth 0.1 and the norm/bias weight-decay exemption are the DeiT code's defaults.
    "deit_pvt": RecipeConfig(name="deit_pvt", optimizer="adamw", lr=5e-4, batch_size=1024, epochs=300,
                             weight_decay=0.05, no_decay_norm_bias=True, schedule="cosine", warmup_epochs=5,
                             warmup_lr=1e-6, label_smoothing=0.1, mixup=0.8, cutmix=1.0, drop_path=0.1,
                             augment=_STRONG_AUGMENT),
    # Mixer and gMLP: AdamW 7e-4, cosine to zero, 300 epochs, batch 1536, wd 0.067, the same augmentation.
    "mixer_gmlp": RecipeConfig(name="mixer_gmlp", optimizer="adamw", lr=7e-4, batch_size=1536, epochs=300,
                               weight_decay=0.067, no_decay_norm_bias=True, schedule="cosine",
                               warmup_epochs=5, warmup_lr=1e-6, label_smoothing=0.1, mixup=0.8, cutmix=1.0,
                               augment=_STRONG_AUGMENT),
    # The aggressive regime of Table 8 (ConvNeXt's defaults): AdamW 4e-3, batch 4096, wd 0.05, 20 warm-up
    # epochs then cosine, 300 epochs, Mixup, CutMix, RandAugment, Random Erasing, stochastic depth 0.1,
    # label smoothing 0.1, layer scale 1e-6, EMA 0.9999.
    "aggressive": RecipeConfig(name="aggressive", optimizer="adamw", lr=4e-3, batch_size=4096, epochs=300,
                               weight_decay=0.05, no_decay_norm_bias=True, schedule="cosine",
                               warmup_epochs=20, min_lr=1e-6, label_smoothing=0.1, mixup=0.8, cutmix=1.0,
                               drop_path=0.1, layer_scale=1e-6, ema_decay=0.9999, augment=_STRONG_AUGMENT),
    # Market-1501 from scratch (A.1.2): SGD 0.065, x0.1 at epochs 150, 225, 300 of 350, batch 64, wd 1e-4.
    "reid_scratch": RecipeConfig(name="reid_scratch", optimizer="sgd", lr=0.065, batch_size=64, epochs=350,
                                 weight_decay=1e-4, schedule="multistep", milestones=(150, 225, 300)),
    # Market-1501 fine-tuning: AMSGrad 3e-4, x0.1 every 60 epochs, 150 epochs, batch 64, wd 1e-4.
    "reid_finetune": RecipeConfig(name="reid_finetune", optimizer="amsgrad", lr=3e-4, batch_size=64,
                                  epochs=150, weight_decay=1e-4, schedule="step", decay_epochs=60),
}


def get_recipe(recipe: str | RecipeConfig | Mapping[str, Any],
               recipes: Mapping[str, RecipeConfig | Mapping[str, Any]] | None = None) -> RecipeConfig:
    """A recipe by name from `recipes` (e.g. params.yaml's) or the built-in ones, or parsed as given."""
    if isinstance(recipe, RecipeConfig):
        return recipe
    if isinstance(recipe, Mapping):
        return parse(RecipeConfig, dict(recipe), "recipe")
    known = {**RECIPES, **(recipes or {})}
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
