"""Train and evaluate one trial: the engine every sweep trial calls (`run_trial`).

One trial = backbone + head + recipe + prepared data + seed (+ image size, epochs, batch of the profile).
The recipe is one of the appendix's (params.yaml `recipes:`) and is fitted to the trial's epochs and
batch without changing its shape. The run is tracked in MLflow (pipeline/tracking.py), checkpointed
atomically after every epoch and resumed from the last checkpoint when started again. Each epoch is
seeded from (seed, epoch), so a resumed run repeats what an uninterrupted one would have done. A
checkpoint records its trial id and the SHA-256 of its content: one that is damaged or another trial's
is set aside (`last.pt.rejected-<n>`) and the trial starts from scratch in a new run.

With `TrainConfig.num_workers > 1` the same loop runs data-parallel in Ray Train's TorchTrainer (gloo on
CPU, NCCL on GPU) with the same global batch; only rank 0 writes checkpoints and logs to MLflow.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Sampler

from . import REPO_ROOT
from .cluster import connect
from .config import (ConfigError, MlflowConfig, RecipeConfig, TrainConfig, TrialConfig, flatten, parse,
                     parse_head_spec, to_dict)
from .data.prepare import CLASSES, MANIFEST, read_meta, require_prepared
from .interrupt import Interrupted, interruptible
from .io import atomic_write, atomic_write_text
from .recipes import ScaledRecipe, get_recipe, scale
from .tracking import RUN_ID_FILE, TrialRun, find_finished, plot_learning_curves, resolve_uri, result_of
from .tracking import git_commit, write_metrics_csv

TRAINING_CODE_VERSION = 2
"""Part of every trial identity. Bump it only when a change to the training code changes results
(so finished runs are no longer reused); refactors that keep results leave it alone."""

UNAPPLIED = ("layer_scale",)
"""Recipe options the backbones have no parameter for (ConvNeXt's layer scale has no counterpart in a
ResNet): recorded on the run as the `recipe_not_applied` tag instead of being silently dropped."""
CHECKPOINT = "last.pt"
CHECKPOINT_MAGIC = b"noah-pipeline checkpoint v1\n"
"""The first line of every checkpoint file; the second holds the payload's length and SHA-256."""
RESULT = "result.json"
EpochCallback = Callable[[dict[str, float]], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite: the trial cannot recover and ends FAILED."""


# ---- identity


def manifest_hash(data_dir: str | Path) -> str:
    """SHA-256 of a prepared dataset's manifest.csv and classes.json (the manifest holds every image's
    own SHA-256, so this changes whenever any image, label or split does)."""
    require_prepared(data_dir, (MANIFEST, CLASSES))
    files = [Path(data_dir) / name for name in (MANIFEST, CLASSES)]
    return _hash_files(tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files))


@functools.lru_cache(maxsize=64)
def _hash_files(files: tuple[tuple[str, int, int], ...]) -> str:
    """Hash of the files' bytes, cached by (path, mtime, size): a trial's identity, tags and config all
    ask for it, and an ImageNet manifest is large."""
    digest = hashlib.sha256()
    for path, _, _ in files:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def resolve_trial(trial: TrialConfig | Mapping[str, Any],
                  recipes: Mapping[str, RecipeConfig | Mapping[str, Any]] | None = None) -> TrialConfig:
    """The trial with its recipe looked up and its head's N and r filled in (what the hash covers)."""
    from .models import resolve_head

    trial = parse(TrialConfig, dict(trial) if isinstance(trial, Mapping) else trial, "trial")
    source = resolve_trial(trial.init_from, recipes) if trial.init_from is not None else None
    return dataclasses.replace(trial, recipe=get_recipe(trial.recipe, recipes),
                               head=resolve_head(trial.backbone, trial.head), init_from=source)


def identity(trial: TrialConfig) -> dict[str, Any]:
    """Everything that determines a resolved trial's result, as plain data."""
    recipe = to_dict(trial.recipe)
    recipe.pop("name")
    scaled = scale(trial.recipe, trial.epochs, trial.batch_size)
    return {"backbone": trial.backbone, "head": to_dict(trial.head), "recipe": recipe,
            "data": manifest_hash(trial.data_dir), "seed": trial.seed, "img_size": trial.img_size,
            "epochs": scaled.epochs, "batch_size": scaled.batch_size, "code": TRAINING_CODE_VERSION,
            **({"init_from": trial_id(trial.init_from)} if trial.init_from is not None else {})}


def trial_id(trial: TrialConfig | Mapping[str, Any],
             recipes: Mapping[str, RecipeConfig | Mapping[str, Any]] | None = None) -> str:
    """The trial identity hash: equal for trials that must give the same result, whatever table asks."""
    text = json.dumps(identity(resolve_trial(trial, recipes)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- seeding, distribution, data


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (epoch seeds stay independent of each other)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class World:
    """This process's place in data-parallel training (rank 0 of 1 without Ray Train)."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    def sum(self, values: list[float]) -> list[float]:
        """`values` summed over all workers."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()


class ShardSampler(Sampler):
    """One worker's share of another sampler's order: every `size`-th item from `rank`. With `pad` the
    order is first padded (wrapping round) to a multiple of `size` so all workers take as many steps."""

    def __init__(self, base: Sampler, world: World, pad: bool):
        self.base, self.world, self.pad = base, world, pad

    def _items(self) -> list[Any]:
        items = list(self.base)
        if self.pad and len(items) % self.world.size:
            items += items[:self.world.size - len(items) % self.world.size]
        return items[self.world.rank::self.world.size]

    def __len__(self) -> int:
        n = len(self.base)
        return math.ceil(n / self.world.size) if self.pad else len(range(self.world.rank, n, self.world.size))

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items())


def _loaders(trial: TrialConfig, scaled: ScaledRecipe, train: TrainConfig, world: World, reid: bool = False
             ) -> tuple[DataLoader, ...]:
    """Train and val loaders; with several workers each takes its shard with batch / workers."""
    from .data import build_loader

    if scaled.batch_size % world.size:
        raise ConfigError("batch_size", scaled.batch_size, f"a multiple of num_workers ({world.size})")
    batch = scaled.batch_size // world.size
    splits = [("train", True), *((s, False) for s in (("query", "gallery") if reid else ("val",)))]
    loaders = [build_loader(trial.data_dir, split, trial.img_size, batch, train=is_train,
                            augment=trial.recipe.augment if is_train else None, workers=train.loader_workers,
                            seed=trial.seed)
               for split, is_train in splits]
    if world.size == 1:
        return tuple(loaders)
    shard = 1 if reid else 2  # reid ranks whole query and gallery splits on every worker
    return tuple(DataLoader(ld.dataset, batch_size=batch, sampler=ShardSampler(ld.sampler, world, pad=is_train),
                            num_workers=train.loader_workers, drop_last=ld.drop_last,
                            persistent_workers=train.loader_workers > 0)
                 for ld, is_train in zip(loaders[:shard], (True, False))) + tuple(loaders[shard:])


def _epoch_sampler_seed(loader: DataLoader, seed: int, epoch: int) -> None:
    """Re-seed the loader's order and augmentation for `epoch` (same on every worker, so shards agree)."""
    sampler = loader.sampler.base if isinstance(loader.sampler, ShardSampler) else loader.sampler
    sampler.generator.manual_seed(_mix(seed, epoch, 1))


# ---- optimisation


def build_optimizer(model: nn.Module, scaled: ScaledRecipe) -> torch.optim.Optimizer:
    """timm's optimizer for the recipe; norms and biases skip weight decay where the recipe says so."""
    from timm.optim import create_optimizer_v2

    r = scaled.recipe
    opt, extra = {"sgd": ("momentum", {}), "adamw": ("adamw", {}), "amsgrad": ("adam", {"amsgrad": True})}[r.optimizer]
    if opt != "momentum":
        extra["betas"] = (r.momentum, 0.999)
    return create_optimizer_v2(model, opt=opt, lr=scaled.lr, weight_decay=r.weight_decay,
                               momentum=r.momentum, filter_bias_and_bn=r.no_decay_norm_bias, **extra)


def build_scheduler(optimizer: torch.optim.Optimizer, scaled: ScaledRecipe, updates_per_epoch: int) -> Any:
    """timm's scheduler stepped every update: linear warm-up, then the recipe's decay over the rest."""
    from timm.scheduler import create_scheduler_v2

    r = scaled.recipe
    warmup = scaled.warmup_epochs
    sched = {"linear": "poly", "step": "step", "multistep": "multistep", "cosine": "cosine"}[r.schedule]
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=scaled.epochs - warmup, warmup_epochs=warmup, warmup_prefix=True,
        warmup_lr=r.warmup_lr, min_lr=r.min_lr, decay_epochs=scaled.decay_epochs,
        decay_milestones=[m - warmup for m in scaled.milestones],
        decay_rate=1.0 if r.schedule == "linear" else r.decay_rate,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    return scheduler


def build_mixup(recipe: RecipeConfig, num_classes: int) -> Any:
    """timm's Mixup/CutMix (with label smoothing folded into its soft targets), or None when off."""
    if recipe.mixup <= 0 and recipe.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=recipe.mixup_prob,
                 switch_prob=recipe.mixup_switch_prob, label_smoothing=recipe.label_smoothing,
                 num_classes=num_classes)


def build_criterion(recipe: RecipeConfig, mixup: Any) -> nn.Module:
    from timm.loss import SoftTargetCrossEntropy

    return SoftTargetCrossEntropy() if mixup is not None else nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)


@dataclass
class Step:
    """What one training epoch needs besides the data."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    criterion: nn.Module
    device: torch.device
    mixup: Any = None
    ema: Any = None
    clip_grad: float | None = None
    updates: int = 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def precision(device: torch.device) -> tuple[contextlib.AbstractContextManager, torch.memory_format]:
    """The autocast context and input memory format of every forward pass (training, evaluation, reid
    ranking, bench-train): bf16 autocast and channels_last on GPU, float32 and contiguous on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16), torch.channels_last
    return contextlib.nullcontext(), torch.contiguous_format


def train_one_epoch(step: Step, loader: DataLoader, progress: Any = None) -> dict[str, float]:
    """One pass over `loader`: bf16 autocast and channels_last on GPU, an lr update per step, EMA.

    Raises NonFiniteLossError at the first NaN/inf loss (checked every step on CPU; every 16 steps on
    GPU, where each check waits for the device)."""
    step.model.train()
    check_every = 16 if step.cuda else 1
    autocast, memory_format = precision(step.device)
    total = torch.zeros((), device=step.device, dtype=torch.float64)
    correct = torch.zeros((), device=step.device, dtype=torch.int64)
    images = batches = 0
    lr = step.optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    for i, batch in enumerate(loader):
        x = batch[0].to(step.device, non_blocking=True, memory_format=memory_format)
        y = batch[1].to(step.device, non_blocking=True)
        if step.mixup is not None:
            x, y = step.mixup(x, y)
        with autocast:
            logits = step.model(x)
            loss = step.criterion(logits, y)
        if (i + 1) % check_every == 0 or i + 1 == len(loader):
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"training loss became {loss.item()} at update {step.updates + 1}")
        step.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step.clip_grad is not None:
            nn.utils.clip_grad_norm_(step.model.parameters(), step.clip_grad)
        step.optimizer.step()
        step.updates += 1
        step.scheduler.step_update(num_updates=step.updates)
        if step.ema is not None:
            step.ema.update(_unwrap(step.model), step=step.updates)
        total += loss.detach()
        correct += (logits.detach().argmax(1) == (y.argmax(1) if y.ndim == 2 else y)).sum()
        images += x.shape[0]
        batches += 1
        if progress is not None:
            progress.update(1)
    if step.cuda:
        torch.cuda.synchronize(step.device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(total):
        raise NonFiniteLossError(f"training loss became {total.item()} by update {step.updates}")
    return {"train_loss": total.item() / max(batches, 1), "lr": lr, "images": images, "correct": correct.item(),
            "epoch_seconds": seconds}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, world: World) -> dict[str, float]:
    """Top-1 and top-5 accuracy (%) over the whole split (each worker counts its shard)."""
    model.eval()
    autocast, memory_format = precision(world.device)
    counts = torch.zeros(3, dtype=torch.float64, device=world.device)
    for batch in loader:
        x = batch[0].to(world.device, non_blocking=True, memory_format=memory_format)
        y = batch[1].to(world.device, non_blocking=True)
        with autocast:
            logits = model(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), torch.tensor(len(y), device=world.device)])
    top1, top5, n = world.sum(counts.tolist())
    return {"top1": 100 * top1 / max(n, 1), "top5": 100 * top5 / max(n, 1)}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---- checkpoints


class CheckpointError(ValueError):
    """A checkpoint that is damaged (truncated, bytes changed), not the trainer's, unsafe to load, or another
    trial's: never trained on."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """One atomic file (never half written): a header line with the payload's length and SHA-256, then
    torch.save's bytes, so that `load_checkpoint` can tell a damaged file from a good one."""
    buffer = BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    header = CHECKPOINT_MAGIC + f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()
    atomic_write(path, lambda f: f.writelines((header, payload)))


def load_checkpoint(path: str | Path, trial_id: str | None = None) -> dict[str, Any] | None:
    """The checkpoint at `path`, or None if there is none; tensors and plain data only (weights_only=True).

    Raises CheckpointError when its header, length or hash does not match its bytes, when it holds more than
    weights_only allows, or when it is not trial `trial_id`'s (when given)."""
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    end = data.find(b"\n", len(CHECKPOINT_MAGIC))
    fields = data[len(CHECKPOINT_MAGIC):end].split() if data.startswith(CHECKPOINT_MAGIC) and end > 0 else []
    if len(fields) != 2 or not fields[0].isdigit():
        raise CheckpointError(f"{path}: not a trainer checkpoint (no valid header)")
    payload, length = memoryview(data)[end + 1:], int(fields[0])
    if len(payload) != length:
        raise CheckpointError(f"{path}: truncated or extended ({len(payload)} bytes after the header, not {length})")
    if hashlib.sha256(payload).hexdigest().encode() != fields[1]:
        raise CheckpointError(f"{path}: damaged (its SHA-256 differs from the one its header records)")
    try:
        state = torch.load(BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot be loaded safely: {err}") from err
    if trial_id is not None and state.get("trial_id") != trial_id:
        raise CheckpointError(f"{path}: belongs to trial {state.get('trial_id')}, not {trial_id}")
    return state


def _set_aside(path: Path) -> Path:
    """Move a rejected checkpoint to the first free `<name>.rejected-<n>` beside it: kept for a look, never
    loaded again."""
    n = 1
    while path.with_name(f"{path.name}.rejected-{n}").exists():
        n += 1
    return path.rename(path.with_name(f"{path.name}.rejected-{n}"))


def _reject_bad_checkpoint(ckpt_dir: Path, tid: str) -> str | None:
    """Set aside the folder's checkpoint if it is damaged or another trial's, so the trial starts from
    scratch; returns why (None: it is good or absent). Run once by the driver, before any worker loads it."""
    path = ckpt_dir / CHECKPOINT
    try:
        load_checkpoint(path, tid)
    except CheckpointError as err:
        return f"{err}; moved to {_set_aside(path).name}"
    return None


# ---- the trial


@dataclass(frozen=True)
class Plan:
    """Everything a training process needs (plain, picklable data: sent to Ray Train workers)."""

    trial: TrialConfig
    scaled: ScaledRecipe
    train: TrainConfig
    trial_id: str
    checkpoint_dir: str
    tracking_uri: str
    run_id: str
    num_classes: int
    log_weights: bool
    reid: bool = False
    init_from: str | None = None
    """The trial id of the classification trial whose checkpoint initialises a fine-tuned backbone."""


class Progress:
    """A tqdm bar per epoch when interactive, else one concise line per epoch (rank 0 only)."""

    def __init__(self, mode: str, total_epochs: int, name: str, enabled: bool):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "line"
        self.mode = mode if enabled else "off"
        self.total_epochs, self.name = total_epochs, name

    def bar(self, epoch: int, steps: int) -> Any:
        if self.mode != "bar":
            return None
        from tqdm import tqdm

        return tqdm(total=steps, desc=f"{self.name} epoch {epoch + 1}/{self.total_epochs}", leave=False,
                    dynamic_ncols=True)

    def line(self, row: Mapping[str, float]) -> None:
        if self.mode == "off":
            return
        print(f"{self.name} epoch {int(row['epoch']) + 1}/{self.total_epochs} loss {row['train_loss']:.4f} "
              f"lr {row['lr']:.3g} top1 {row['val_top1']:.2f} top5 {row['val_top5']:.2f} "
              f"{row['images_per_s_epoch']:.0f} img/s {row['epoch_seconds']:.1f}s", file=sys.stderr, flush=True)


def fit(plan: Plan, world: World, on_epoch: EpochCallback | None = None,
        wrap: Callable[[nn.Module], nn.Module] | None = None) -> dict[str, Any]:
    """Train `plan` from its last checkpoint to the end and evaluate it; rank 0 checkpoints and logs.

    `wrap` makes the data-parallel model (Ray Train's prepare_model) when there are several workers."""
    from timm.utils import ModelEmaV3

    from .models import build_model

    trial, scaled, recipe = plan.trial, plan.scaled, plan.trial.recipe
    lead = world.rank == 0
    ckpt_dir = Path(plan.checkpoint_dir)
    seed_everything(_mix(trial.seed, 0))
    from .reid import build_reid_model, evaluate_reid, load_backbone

    model = (build_reid_model(trial.backbone, trial.head, plan.num_classes, trial.img_size) if plan.reid else
             build_model(trial.backbone, trial.head, plan.num_classes, trial.img_size, trial.recipe.drop_path))
    params, madds = _complexity(model, trial.img_size) if lead else (0, 0)
    cuda = world.device.type == "cuda"
    model.to(world.device, memory_format=precision(world.device)[1])
    optimizer = build_optimizer(model, scaled)
    ema = ModelEmaV3(model, decay=recipe.ema_decay) if recipe.ema_decay else None
    state = load_checkpoint(ckpt_dir / CHECKPOINT, plan.trial_id)
    history: list[dict[str, float]] = []
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.module.load_state_dict(state["ema"])
        history, start_epoch = state["history"], state["epoch"]
    elif plan.init_from is not None:
        load_backbone(model, trial_folder(plan.train, plan.init_from) / CHECKPOINT, plan.init_from)
    train_loader, *val_loaders = _loaders(trial, scaled, plan.train, world, plan.reid)

    def validate(net: nn.Module) -> dict[str, float]:
        if not plan.reid:
            return evaluate(net, val_loaders[0], world)
        m = evaluate_reid(_unwrap(net), *val_loaders)
        return {"top1": m["rank1"], "top5": m["rank5"], "map": m["map"]}

    mixup = build_mixup(recipe, plan.num_classes)
    step = Step(model=wrap(model) if wrap else model, optimizer=optimizer,
                scheduler=build_scheduler(optimizer, scaled, len(train_loader)),
                criterion=build_criterion(recipe, mixup), device=world.device, mixup=mixup, ema=ema,
                clip_grad=recipe.clip_grad, updates=start_epoch * len(train_loader))
    step.scheduler.step_update(num_updates=step.updates)
    run = TrialRun(plan.tracking_uri, plan.run_id) if lead else None
    if run is not None:
        device = torch.cuda.get_device_name(world.device) if cuda else "cpu"
        run.set_tags({"world_size": world.size, "device": device, "precision": "bf16" if cuda else "fp32"})
        run.log_epochs(history)  # epochs checkpointed before a crash but not yet logged
    progress = Progress(plan.train.progress, scaled.epochs, f"{trial.backbone}/{trial.head.name}", lead)
    for epoch in range(start_epoch, scaled.epochs):
        seed_everything(_mix(trial.seed, epoch, world.rank))
        _epoch_sampler_seed(train_loader, trial.seed, epoch)
        bar = progress.bar(epoch, len(train_loader))
        try:
            stats = train_one_epoch(step, train_loader, bar)
        finally:
            if bar is not None:
                bar.close()
        images, correct = world.sum([stats["images"], stats["correct"]])
        # train_top1 is against the (mixed) targets' argmax: Fig. 3's training curve, under augmentation
        row = {"epoch": float(epoch), "train_loss": stats["train_loss"], "lr": stats["lr"],
               "train_top1": 100.0 * correct / max(images, 1),
               "images_per_s_epoch": images / stats["epoch_seconds"], "epoch_seconds": stats["epoch_seconds"]}
        row.update({f"val_{k}": v for k, v in validate(step.model).items()})
        if ema is not None:
            row.update({f"val_{k}_ema": v for k, v in validate(ema.module).items()})
        history.append(row)
        if lead:
            save_checkpoint(ckpt_dir / CHECKPOINT, {
                "epoch": epoch + 1, "history": history, "trial_id": plan.trial_id,
                "model": _unwrap(step.model).state_dict(), "optimizer": optimizer.state_dict(),
                "ema": ema.module.state_dict() if ema is not None else None})
            run.log_epochs([row])
            progress.line(row)
            if on_epoch is not None:
                on_epoch(row)
    if not lead:
        return {}
    last = history[-1]
    result = {"top1": last["val_top1"], "top5": last["val_top5"],
              "best_top1": max(row["val_top1"] for row in history), "params": params, "madds": madds,
              "train_seconds": sum(row["epoch_seconds"] for row in history),
              "images_per_s": sum(row["images_per_s_epoch"] for row in history) / len(history)}
    if plan.reid:
        result["map"] = last["val_map"]
    if ema is not None:
        result.update(top1_ema=last["val_top1_ema"], top5_ema=last["val_top5_ema"])
    run.log_final(result)
    _log_artifacts(run, plan, history, _unwrap(step.model))
    atomic_write_text(ckpt_dir / RESULT, json.dumps(result))
    return result


def _complexity(model: nn.Module, img_size: int) -> tuple[int, int]:
    from .complexity import count

    return count(model, img_size=img_size)


def _log_artifacts(run: TrialRun, plan: Plan, history: list[dict[str, float]], model: nn.Module) -> None:
    """The resolved config, the metrics CSV, the learning curves and (when asked) the weights."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "config.yaml").write_text(yaml.safe_dump(resolved_config(plan), sort_keys=False))
        write_metrics_csv(folder / "metrics.csv", history)
        plot_learning_curves(folder / "learning_curve.png", history,
                             f"{plan.trial.backbone} + {plan.trial.head.name} ({plan.trial.recipe.name})")
        for name in ("config.yaml", "metrics.csv", "learning_curve.png"):
            run.log_artifact(folder / name)
        if plan.log_weights:
            torch.save(model.state_dict(), folder / "weights.pt")
            run.log_artifact(folder / "weights.pt", "weights")


def resolved_config(plan: Plan) -> dict[str, Any]:
    """The trial as it ran: resolved trial, the recipe fitted to it, and how it ran."""
    scaled = {k: v for k, v in to_dict(plan.scaled).items() if k != "recipe"}
    return {"trial_id": plan.trial_id, "training_code_version": TRAINING_CODE_VERSION,
            "trial": to_dict(plan.trial), "scaled": scaled, "train": to_dict(plan.train),
            "data": {"num_classes": plan.num_classes, "manifest_hash": manifest_hash(plan.trial.data_dir)}}


def _ray_worker(config: dict[str, Any]) -> None:
    """The per-worker entry of Ray Train's TorchTrainer."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    world = World(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())
    fit(config["plan"], world, wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=False))


def _fit_ray(plan: Plan) -> dict[str, Any]:
    """Run `fit` on `num_workers` Ray Train workers (in the Ray this process is connected to, else the
    cluster at RAY_ADDRESS, else a local Ray on loopback)."""
    connect()
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer

    use_gpu = plan.train.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= plan.train.num_workers
    result_file = Path(plan.checkpoint_dir) / RESULT
    result_file.unlink(missing_ok=True)
    trainer = TorchTrainer(
        _ray_worker, train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=plan.train.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(name=f"train-{plan.trial_id}", storage_path=str(Path(plan.checkpoint_dir) / "ray"),
                             failure_config=FailureConfig(max_failures=0)))
    try:
        trainer.fit()
    except WorkerGroupError as err:  # surface rank 0's own error (e.g. NonFiniteLossError), as with 1 worker
        cause = err.worker_failures.get(0) or next(iter(err.worker_failures.values()), None)
        if isinstance(cause, Exception):
            raise cause from err
        raise
    return json.loads(result_file.read_text())


def _device(train: TrainConfig) -> torch.device:
    if train.use_gpu is False or not torch.cuda.is_available():
        if train.use_gpu:
            raise ConfigError("use_gpu", True, "false or null on a machine without a CUDA GPU")
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def trial_folder(train: TrainConfig, tid: str) -> Path:
    """A trial's checkpoint folder under `train.checkpoint_root` (absolute: Ray may change the working folder)."""
    return (REPO_ROOT / train.checkpoint_root / tid).absolute()


def run_trial(trial: TrialConfig | Mapping[str, Any], *,
              recipes: Mapping[str, RecipeConfig | Mapping[str, Any]] | None = None,
              train: TrainConfig = TrainConfig(), tracking: MlflowConfig = MlflowConfig(),
              experiment: str = "noah", parent_run_id: str | None = None,
              checkpoint_dir: str | Path | None = None, reuse: bool = True,
              on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    """Train and evaluate one trial, tracked as one MLflow run; returns its final metrics.

    A trial whose identity already has a FINISHED run is not trained again. Otherwise it resumes from
    the last checkpoint in `checkpoint_dir` (default `<checkpoint_root>/<trial_id>`) and the same MLflow
    run, if they are this trial's (a damaged or foreign checkpoint is set aside and noted in the new run's
    `checkpoint_rejected` tag). `reuse=False` ignores both and trains from scratch into a new run. Any error
    ends the run FAILED with the error text as its `failure_reason` tag; SIGTERM or SIGINT ends it KILLED
    (in the main thread; raises `Interrupted`).
    `on_epoch` gets each epoch's metrics (in the rank-0 process), e.g. to report to Ray Tune.
    """
    trial = resolve_trial(trial, recipes)
    classes, stats = read_meta(trial.data_dir)
    scaled = scale(trial.recipe, trial.epochs, trial.batch_size)
    if scaled.recipe.mixup > 0 or scaled.recipe.cutmix > 0:
        if scaled.batch_size // train.num_workers % 2:
            raise ConfigError("batch_size", scaled.batch_size, "an even batch per worker (Mixup/CutMix pair images)")
    tid = trial_id(trial)
    uri = resolve_uri(tracking.tracking_uri)
    if reuse and (done := find_finished(tid, uri)) is not None:
        return result_of(done)
    source_id = trial_id(trial.init_from) if trial.init_from is not None else None
    if source_id is not None and not (trial_folder(train, source_id) / CHECKPOINT).is_file():
        raise ConfigError("init_from", source_id, f"a trained classification trial (no checkpoint at "
                          f"{trial_folder(train, source_id) / CHECKPOINT}; run that trial first)")
    ckpt_dir = Path(checkpoint_dir).absolute() if checkpoint_dir else trial_folder(train, tid)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    rejected = _reject_bad_checkpoint(ckpt_dir, tid)  # before --retrain deletes: only this trial's own goes
    if not reuse:
        for name in (CHECKPOINT, RESULT, RUN_ID_FILE):
            (ckpt_dir / name).unlink(missing_ok=True)
    if rejected is not None:  # training starts from scratch: into a new run, not over the old run's epochs
        (ckpt_dir / RUN_ID_FILE).unlink(missing_ok=True)
        print(f"warning: checkpoint rejected, training from scratch: {rejected}", file=sys.stderr)
    device = _device(train) if train.num_workers == 1 else torch.device("cpu")
    commit = git_commit()
    tags = {"trial_id": tid, "git_commit": commit, "mlflow.source.git.commit": commit,
            "data_manifest_hash": manifest_hash(trial.data_dir), "backbone": trial.backbone,
            "head": trial.head.name, "recipe": trial.recipe.name}
    unapplied = [k for k in UNAPPLIED if getattr(trial.recipe, k)]
    if unapplied:
        tags["recipe_not_applied"] = ", ".join(unapplied) + " (no such parameter in this backbone)"
    run = TrialRun.open(uri, experiment, ckpt_dir, run_name=f"{trial.backbone} {trial.head.name} {trial.recipe.name}",
                        tags=tags, parent_run_id=parent_run_id)
    plan = Plan(trial=trial, scaled=scaled, train=train, trial_id=tid, checkpoint_dir=str(ckpt_dir),
                tracking_uri=uri, run_id=run.run_id, num_classes=len(classes), log_weights=tracking.log_weights,
                reid=stats.get("task") == "reid", init_from=source_id)
    try:
        with interruptible():
            if rejected is not None:
                run.set_tags({"checkpoint_rejected": rejected})
            run.log_params(flatten(resolved_config(plan)))
            if train.num_workers == 1:
                result = fit(plan, World(device=device), on_epoch)
            else:
                result = _fit_ray(plan)
    except Exception as err:
        run.fail(f"{type(err).__name__}: {err}")
        raise
    except BaseException as err:
        run.fail(f"interrupted: {err if isinstance(err, Interrupted) else type(err).__name__}", killed=True)
        raise
    run.finish()
    return {**result, "run_id": run.run_id, "trial_id": tid, "status": "FINISHED", "reason": None}


# ---- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, help="a backbones.csv key, e.g. resnet18")
    parser.add_argument("--head", default="kind=noah", help="head options, e.g. kind=noah,N=4,r=0.5")
    parser.add_argument("--recipe", default="resnet", help="a recipe name of params.yaml `recipes:`")
    parser.add_argument("--data", required=True, help="a prepared dataset folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (lr scales with it)")
    parser.add_argument("--experiment", default="train", help="MLflow experiment name")
    parser.add_argument("--params", default=None,
                        help="read `recipes`, `mlflow` and `train` from this file (default: the repository's)")
    parser.add_argument("--tracking-uri", default=None, help="default: params.yaml mlflow.tracking_uri")
    parser.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (1: in this process)")
    parser.add_argument("--gpu", choices=("auto", "yes", "no"), default=None)
    parser.add_argument("--loader-workers", type=int, default=None)
    parser.add_argument("--checkpoint-dir", default=None, help="default: checkpoints/<trial_id>")
    parser.add_argument("--log-weights", action="store_true", help="store the final weights in MLflow")
    parser.add_argument("--retrain", action="store_true", help="train even if a FINISHED run exists")


def run(args: argparse.Namespace) -> int:
    from .study import PARAMS, load_params

    params = load_params(args.params or PARAMS)
    overrides = {k: v for k, v in (("num_workers", args.num_workers), ("loader_workers", args.loader_workers))
                 if v is not None}
    if args.gpu is not None:
        overrides["use_gpu"] = {"auto": None, "yes": True, "no": False}[args.gpu]
    train = parse(TrainConfig, {**to_dict(params.train), **overrides}, "train")
    tracking = dataclasses.replace(params.mlflow, tracking_uri=args.tracking_uri or params.mlflow.tracking_uri,
                                   log_weights=args.log_weights or params.mlflow.log_weights)
    trial = {"backbone": args.backbone, "head": parse_head_spec(args.head), "recipe": args.recipe,
             "data_dir": args.data, "seed": args.seed, "img_size": args.img_size, "epochs": args.epochs,
             "batch_size": args.batch_size}
    try:
        result = run_trial(trial, recipes=params.recipes, train=train, tracking=tracking,
                           experiment=args.experiment, checkpoint_dir=args.checkpoint_dir, reuse=not args.retrain)
    except Interrupted as err:
        print(f"interrupted by {err}: the run is marked KILLED, its checkpoint kept", file=sys.stderr)
        return 128 + err.signum
    print(json.dumps(result, indent=2))
    return 0
