"""The two tasks a trial can train: image classification (Tables 1-8, 11) and person re-identification
(Table 9). A task is chosen once, from the prepared dataset's `task`, and says what differs: the model,
the evaluation splits and metrics, the result keys and how a fine-tuned backbone is initialised.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import ConfigError
from ..data.loaders import Loader
from ..data.prepared import num_classes, read_meta, read_split
from ..models import ReidNet, build_model, build_reid_model
from .engine import World, evaluate, precision, unwrap
from .ranking import market1501_metrics, pairwise_distance
from .record import load_checkpoint
from .trial import Trial


class Task:
    """What a trial of this task builds, evaluates and reports."""

    name: ClassVar[str]
    eval_splits: ClassVar[tuple[str, ...]]
    shard_eval: ClassVar[bool]
    """Whether data-parallel workers each evaluate a shard (and sum counts) or the whole splits."""
    result_keys: ClassVar[tuple[str, ...]] = ()
    """Final metrics besides top-1 and top-5, taken from the last epoch's `val_<key>`."""

    def build_model(self, trial: Trial, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def validate(self, model: nn.Module, loaders: list[Loader], world: World) -> dict[str, float]:
        """`top1`, `top5` (%) and the task's `result_keys` on the evaluation splits."""
        raise NotImplementedError

    def initialise(self, model: nn.Module, checkpoint: Path, source_id: str) -> None:
        """Load the backbone of trial `source_id`'s checkpoint into `model` (fine-tuning)."""
        raise ConfigError("init_from", source_id, f"a trial of a task that fine-tunes (not {self.name})")

    def chance(self, data_dir: str | Path) -> dict[str, float | int]:
        """`top1`, `top5` (%) (and the task's `result_keys`) of a model that ignores its input on this
        dataset's evaluation splits, and `images`, the evaluated images (queries, for reid)."""
        raise NotImplementedError


class Classification(Task):
    name, eval_splits, shard_eval = "classification", ("val",), True

    def build_model(self, trial: Trial, num_classes: int) -> nn.Module:
        return build_model(trial.backbone, trial.head, num_classes, trial.img_size, trial.recipe.drop_path,
                           trial.recipe.zero_init_last, trial.recipe.block_dropout, trial.width)

    def validate(self, model: nn.Module, loaders: list[Loader], world: World) -> dict[str, float]:
        return evaluate(model, loaders[0], world)

    def chance(self, data_dir: str | Path) -> dict[str, float | int]:
        classes = num_classes(data_dir) or 1
        return {"top1": 100 / classes, "top5": 100 * min(5, classes) / classes,
                "images": len(read_split(data_dir, self.eval_splits[0]))}


class ReIdentification(Task):
    """Identities as classes in training; ranked by embedding distance (rank-1/rank-5 as top-1/top-5, mAP)."""

    name, eval_splits, shard_eval, result_keys = "reid", ("query", "gallery"), False, ("map",)

    def build_model(self, trial: Trial, num_classes: int) -> nn.Module:
        return build_reid_model(trial.backbone, trial.head, num_classes, trial.img_size, trial.recipe.zero_init_last,
                                trial.width)

    def validate(self, model: nn.Module, loaders: list[Loader], world: World) -> dict[str, float]:
        m = evaluate_reid(unwrap(model), *loaders)
        return {"top1": m["rank1"], "top5": m["rank5"], "map": m["map"]}

    def initialise(self, model: nn.Module, checkpoint: Path, source_id: str) -> None:
        load_backbone(model, checkpoint, source_id)

    def chance(self, data_dir: str | Path, draws: int = 5) -> dict[str, float | int]:
        """The mean over `draws` random rankings (seeded) under the Market-1501 protocol: its junk and
        same-camera rules make the chance level depend on the gallery, so it is measured, not derived."""
        query, gallery = (read_split(data_dir, split) for split in self.eval_splits)
        generator = torch.Generator().manual_seed(0)
        runs = [market1501_metrics(torch.rand(len(query), len(gallery), generator=generator), query.pid,
                                   gallery.pid, query.camid, gallery.camid) for _ in range(draws)]
        level = {key: 100 * sum(r[rank] for r in runs) / draws
                 for key, rank in (("top1", "rank1"), ("top5", "rank5"), ("map", "map"))}
        return {**level, "images": int(runs[0]["num_valid_queries"])}


TASKS: dict[str, Task] = {t.name: t for t in (Classification(), ReIdentification())}


def chance_levels(data_dir: str | Path) -> dict[str, float | int]:
    """What a prepared dataset's task scores by chance (`Task.chance`): the level a report compares with."""
    return task_of(read_meta(data_dir)[1]).chance(data_dir)


def task_of(stats: dict[str, Any]) -> Task:
    """The task of a prepared dataset, from its stats.json."""
    name = stats.get("task", "classification")
    if name not in TASKS:
        raise ConfigError("task", name, "one of " + ", ".join(TASKS) + " (a prepared dataset's stats.json)")
    return TASKS[name]


def load_backbone(model: ReidNet, checkpoint: str | Path, trial_id: str | None = None) -> list[str]:
    """Initialise `model`'s backbone from a classification checkpoint of the same backbone and head.

    `checkpoint` is the trainer's, read and verified by its `load_checkpoint` (CheckpointError when damaged
    or, with `trial_id`, another trial's). Every backbone tensor must be there with its shape (strict); the
    checkpoint's classifier (its own FC, or its NOAH head over the classification classes) is left out and
    the reid embedding head and identity classifier keep their fresh initialisation. Returns the skipped keys.
    """
    found = load_checkpoint(checkpoint, trial_id)
    if found is None:
        raise ConfigError("init_from", str(checkpoint), "the path of a classification checkpoint file")
    state = found["model"]
    own = model.backbone.state_dict()
    missing = [k for k in own if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or wrong:
        problem = f"missing {missing[:3]}" if missing else f"shapes differ: {wrong[:3]}"
        raise ConfigError("init_from", str(checkpoint), f"a checkpoint of this backbone ({problem})")
    skipped = sorted(set(state) - set(own))
    noah_head = any(k.startswith("head.") for k in skipped)
    if noah_head != (model.head_cfg.kind == "noah"):
        found = "NOAH" if noah_head else "its own (baseline)"
        raise ConfigError("init_from", str(checkpoint), f"a classification checkpoint with a "
                          f"{model.head_cfg.kind} head like this reid model's (it has {found} head)")
    model.backbone.load_state_dict({k: state[k] for k in own}, strict=True)
    return skipped


@torch.inference_mode()
def extract(model: ReidNet, loader: Loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings (float32), person ids and camera ids of every image a reid loader yields."""
    model.eval()
    device = next(model.parameters()).device
    autocast, memory_format = precision(device)
    feats, pids, camids = [], [], []
    for batch in loader:
        if len(batch) != 4:
            raise ValueError("a reid loader yields (images, labels, pids, camids); this one yields "
                             f"{len(batch)} items (is the dataset a reid one?)")
        with autocast:
            feats.append(model.embed(batch[0].to(device, non_blocking=True, memory_format=memory_format)).float())
        pids.append(batch[2])
        camids.append(batch[3])
    return torch.cat(feats), torch.cat(pids), torch.cat(camids)


def evaluate_reid(model: ReidNet, query_loader: Loader, gallery_loader: Loader) -> dict[str, float]:
    """Rank-1, rank-5 and mAP (%) of `model` on Market-1501-style query and gallery loaders.

    The loaders must cover their whole split (not a data-parallel shard): every rank can call this and
    gets the same numbers. Distances are computed on the model's device.
    """
    q, q_pids, q_camids = extract(model, query_loader)
    g, g_pids, g_camids = extract(model, gallery_loader)
    out = market1501_metrics(pairwise_distance(q, g), q_pids, g_pids, q_camids, g_camids)
    return {"rank1": 100 * out["rank1"], "rank5": 100 * out["rank5"], "map": 100 * out["map"]}
