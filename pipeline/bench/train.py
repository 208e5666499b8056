"""`python -m pipeline bench-train`: the trainer's images/s beside a bare PyTorch loop's, in one run.

Both train the same model at the same batch on the same in-memory tensors (no decoding, so the loop
itself is what is measured), with the same precision (bf16 autocast and channels_last on GPU). The bare
loop is forward, cross-entropy, backward, SGD step; the trainer is `train_one_epoch` with the recipe's
timm optimizer and per-update scheduler, loss checks and (if the recipe has them) Mixup and EMA. Short
passes alternate and the best of `--repeats` counts (the median is shown too), so load from other
processes on a shared machine hits both alike.

Beside them: the trainer with the backbone's baseline head (what NOAH costs in training), and with
`--compile` (auto: on CUDA) both trainers through `torch.compile`.

With `--data DIR` (a prepared dataset) the trainer also runs on batches from the project's loader over
its training split, decoded as a trial decodes them: beside the in-memory trainer this says whether a
trial is loader-bound (the target: at least 90 % of the in-memory trainer's images/s).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
from collections.abc import Iterator
from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..config import PARAMS, ConfigError, load_params, parse_head_spec
from ..data.loaders import Loader, build_loader
from ..models import build_model, resolve_head
from ..study.cost import equivalent_tflops
from ..training.engine import Step, compiled, compiles, placed, precision, precision_name, train_one_epoch
from ..training.recipes import (
    ScaledRecipe,
    build_criterion,
    build_mixup,
    build_optimizer,
    build_scheduler,
    get_recipe,
    scale,
)
from .timing import timed_in_turns, walls

TARGET = 0.90


def bare_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, device: torch.device) -> None:
    """One plain PyTorch pass over `loader` (timed, with the device synchronised, by `timed_in_turns`)."""
    autocast, memory_format = precision(device)
    model.train()
    for x, y in loader:
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        with autocast:
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


class Take:
    """The first `steps` batches of a loader, once per pass (its workers stay up between passes)."""

    def __init__(self, loader: Loader, steps: int):
        self.loader, self.steps = loader, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(self.loader, self.steps)


def trainer(model: nn.Module, scaled: ScaledRecipe, steps: int, num_classes: int, device: torch.device) -> Step:
    """A `train_one_epoch` step of `model` with the recipe's optimizer, schedule, Mixup and EMA."""
    optimizer = build_optimizer(model, scaled)
    mixup = build_mixup(scaled.recipe, num_classes)
    ema = ModelEmaV3(model, decay=scaled.recipe.ema_decay) if scaled.recipe.ema_decay else None
    return Step(model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, scaled, steps),
                criterion=build_criterion(scaled.recipe, mixup), device=device, mixup=mixup, ema=ema)


def bench(backbone: str, head: Any, recipe_name: str, img_size: int, batch_size: int, steps: int,
          repeats: int, num_classes: int, device: torch.device, data_dir: str | None = None,
          loader_workers: int = 0, compile: bool = False) -> dict[str, Any]:
    """Best-of-`repeats` images/s of the bare loop, of the trainer and of the trainer with the backbone's
    baseline head (and with `compile` of both trainers through `torch.compile`, and of the trainer on the
    loader over `data_dir`), alternating."""
    head = resolve_head(backbone, head)
    if steps < 2 or repeats < 1:
        raise ConfigError("--steps/--repeats", (steps, repeats), "steps >= 2 and repeats >= 1")
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    models = {name: placed(build_model(backbone, h, num_classes, img_size), device)
              for name, h in (("trainer", head), ("baseline", resolve_head(backbone, {"kind": "baseline"})))}
    twin = copy.deepcopy(models["trainer"])
    data = TensorDataset(torch.randn(steps * batch_size, 3, img_size, img_size),
                         torch.randint(0, num_classes, (steps * batch_size,)))
    loader = DataLoader(data, batch_size=batch_size, pin_memory=cuda)
    scaled = scale(get_recipe(recipe_name, load_params(PARAMS).recipes), epochs=10, batch_size=batch_size)
    bare_opt = torch.optim.SGD(twin.parameters(), lr=scaled.lr, momentum=0.9, weight_decay=1e-4)
    if compile:
        models |= {f"{name}_compiled": compiled(copy.deepcopy(model), True) for name, model in list(models.items())}
    trainers = {name: trainer(model, scaled, steps, num_classes, device) for name, model in models.items()}
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    methods = {"bare": lambda: bare_epoch(twin, bare_opt, loader, device),
               **{name: (lambda s=s: train_one_epoch(s, loader)) for name, s in trainers.items()}}
    if data_dir is not None:
        real = build_loader(data_dir, "train", img_size, batch_size, train=True, augment=scaled.recipe.augment,
                            workers=loader_workers, device=device, device_decode=cuda)
        if len(real) < steps:
            raise ConfigError("--data", data_dir, f"a prepared dataset with at least {steps} batches of {batch_size} "
                              f"training images (it has {len(real)})")
        methods["loader"] = lambda: train_one_epoch(trainers["trainer"], Take(real, steps))
    times = walls(timed_in_turns(methods, repeats, warmup=1, sync=sync))
    images = steps * batch_size
    best = {k: images / min(v) for k, v in times.items()}
    median = {k: images / statistics.median(v) for k, v in times.items()}
    out = {"backbone": backbone, "head": head.name, "recipe": recipe_name, "img_size": img_size,
           "batch_size": batch_size, "steps": steps, "repeats": repeats, "device": str(device),
           "precision": "bf16 autocast, channels_last" if precision_name(device) == "bf16" else "fp32",
           "compile": compile,
           **{f"{k}_images_per_s": v for k, v in best.items()},
           **{f"{k}_images_per_s_median": v for k, v in median.items()},
           "ratio": best["trainer"] / best["bare"], "ratio_median": median["trainer"] / median["bare"],
           "head_ratio": best["trainer"] / best["baseline"], "target": TARGET}
    resolved = resolve_head(backbone, head)
    out |= {f"{k}_gpu_tflops": equivalent_tflops(best[k], backbone, resolved, img_size) for k in ("trainer", "loader")
            if k in best}
    if compile:
        out.update(compile_speedup=best["trainer_compiled"] / best["trainer"],
                   head_ratio_compiled=best["trainer_compiled"] / best["baseline_compiled"])
    if data_dir is not None:
        out.update(loader_workers=loader_workers, loader_ratio=best["loader"] / best["trainer"])
    return out


LABELS = {"bare": "bare PyTorch loop", "trainer": "trainer", "baseline": "trainer, baseline head",
          "trainer_compiled": "trainer, compiled", "baseline_compiled": "baseline, compiled",
          "loader": "trainer on loader"}


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda", "cpu or auto on a machine without a CUDA GPU")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    compile = compiles({"auto": None, "on": True, "off": False}[args.compile], device)  # train.compile's rule
    out = bench(args.backbone, parse_head_spec(args.head), args.recipe, args.img_size, args.batch_size,
                args.steps, args.repeats, args.num_classes, device, args.data, args.loader_workers, compile)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"bench-train {out['backbone']} + {out['head']}, recipe {out['recipe']}, batch {out['batch_size']}, "
          f"{out['img_size']} px, {out['device']} ({out['precision']}), {out['steps']} steps x {out['repeats']} "
          f"(alternating)")
    print(f"  {'':24} {'best img/s':>12} {'median img/s':>14}")
    for key, label in LABELS.items():
        if f"{key}_images_per_s" in out:
            print(f"  {label:24} {out[f'{key}_images_per_s']:12.1f} {out[f'{key}_images_per_s_median']:14.1f}")
    print(f"  {'trainer / bare':24} {100 * out['ratio']:11.1f}% {100 * out['ratio_median']:13.1f}%   "
          f"(target >= {100 * TARGET:.0f}% on best: {'met' if out['ratio'] >= TARGET else 'NOT met'})")
    print(f"  {'trainer / baseline head':24} {100 * out['head_ratio']:11.1f}%")
    if compile:
        print(f"  {'compiled / eager':24} {100 * out['compile_speedup']:11.1f}%")
        print(f"  {'same / baseline, compiled':24} {100 * out['head_ratio_compiled']:11.1f}%")
    if args.data is not None:
        print(f"  {'loader / in-memory':24} {100 * out['loader_ratio']:11.1f}%   ({out['loader_workers']} loader "
              f"workers; target >= {100 * TARGET:.0f}%: {'met' if out['loader_ratio'] >= TARGET else 'NOT met'})")
    rates = ", ".join(f"{out[f'{k}_gpu_tflops']:.3g} ({LABELS[k]})" for k in ("trainer", "loader")
                      if f"{k}_gpu_tflops" in out)
    print(f"  as a profile's gpu_tflops (the rate `plan` prices this model at): {rates}")
    return 0
