"""What a trial costs, in device-hours: the one cost model that `plan` reports and the study's schedule
orders trials by.

A trial costs epochs × training images × the model's MAdds per image ÷ the MAdds per second one device
sustains in training. That rate is measured where the same backbone has already trained on the same data
at the same image size (any head: the MAdds carry the difference), from the FINISHED MLflow runs'
`images_per_s` and `madds`; elsewhere it is `gpu_tflops` of the profile with forward + backward counted as
three forwards of two FLOPs per multiply-add. Evaluation and start-up are not counted.
"""
from __future__ import annotations

import functools
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import PrepareConfig
from ..data.prepared import train_images
from ..models.complexity import measure
from ..training.tracking import TRIAL_TAG, client, local_store
from ..training.trial import Trial

TRAIN_FLOPS_PER_MADD = 3 * 2  # forward + backward ~ 3 forwards; one multiply-add = 2 FLOPs


@dataclass(frozen=True)
class Measured:
    """What MLflow knows before a study runs: the FINISHED trial identities and, per (backbone, data
    folder, image size), the training MAdds/s one device sustained (median over runs)."""

    finished: frozenset[str] = frozenset()
    rates: dict[tuple[str, str, int], float] = field(default_factory=dict)


def read_measured(tracking_uri: str) -> Measured:
    """Read `Measured` from the store at `tracking_uri`; an absent SQLite store means nothing (and stays absent)."""
    local = local_store(tracking_uri)
    if local is not None and not local.exists():
        return Measured()
    mlflow_client = client(tracking_uri)
    ids = [e.experiment_id for e in mlflow_client.search_experiments()]
    runs = mlflow_client.search_runs(ids, filter_string="attributes.status = 'FINISHED'") if ids else []
    speeds: dict[tuple[str, str, int], list[float]] = {}
    for run in runs:
        metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
        if {"images_per_s", "madds"} <= metrics.keys() and {"trial.data_dir", "trial.img_size"} <= params.keys():
            key = (tags.get("backbone", ""), params["trial.data_dir"], int(params["trial.img_size"]))
            per_device = metrics["images_per_s"] / max(int(tags.get("world_size", 1)), 1)
            speeds.setdefault(key, []).append(per_device * metrics["madds"])
    return Measured(frozenset(r.data.tags[TRIAL_TAG] for r in runs if TRIAL_TAG in r.data.tags),
                    {k: statistics.median(v) for k, v in speeds.items()})


def _train_images(trial: Trial, datasets: Mapping[str, PrepareConfig]) -> int | None:
    """Training images of the trial's data: as prepared, else what its entry of `datasets` expects."""
    prepared = train_images(trial.data_dir)
    if prepared is not None:
        return prepared
    return next(d for d in datasets.values() if str(Path(trial.data_dir)).endswith(d.out)).train_images


@functools.cache
def _madds(backbone: str, head: Any, img_size: int, width: float = 1.0) -> int:
    return measure(backbone, head, img_size=img_size, width=width)[1]


def trial_hours(trial: Trial, measured: Measured, datasets: Mapping[str, PrepareConfig],
                gpu_tflops: float) -> float | None:
    """Estimated device-hours of one trial (None when its training set size is unknown): at `measured`'s rate
    where known, else at `gpu_tflops`; `datasets` (the `datasets:` entries) give the size of unprepared data."""
    images = _train_images(trial, datasets)
    if images is None:
        return None
    madds = _madds(trial.backbone, trial.head, trial.img_size, trial.width)
    rate = measured.rates.get((trial.backbone, str(trial.data_dir), trial.img_size),
                              gpu_tflops * 1e12 / TRAIN_FLOPS_PER_MADD)
    return trial.epochs * images * madds / rate / 3600


def equivalent_tflops(images_per_s: float, backbone: str, head: Any, img_size: int) -> float:
    """The `gpu_tflops` at which this model prices at `images_per_s` training images a second (`bench-train`'s
    measurement): the value that puts a speed measured on a GPU into a profile before any trial has run there."""
    return images_per_s * _madds(backbone, head, img_size) * TRAIN_FLOPS_PER_MADD / 1e12
