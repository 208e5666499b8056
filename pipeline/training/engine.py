"""The training engine: one epoch of updates, evaluation, numeric precision, compilation and GPU determinism.

Nothing here knows about trials, MLflow or Ray: `run.fit` drives it, `bench.train` times it.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data.loaders import Loader
from ..utils.machine import native_bf16


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite: the trial cannot recover and ends FAILED."""


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


def bf16(device: torch.device) -> bool:
    """Whether `device` trains in bf16: a GPU, or a CPU that computes it in hardware."""
    return device.type == "cuda" or native_bf16()


def precision(device: torch.device) -> tuple[contextlib.AbstractContextManager, torch.memory_format]:
    """The autocast context and input memory format of every forward pass (training, evaluation, reid
    ranking, bench-train): bf16 autocast and channels_last on a GPU and on a CPU that computes bf16 in
    hardware (`native_bf16`), float32 and contiguous on other CPUs."""
    if bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16), torch.channels_last
    return contextlib.nullcontext(), torch.contiguous_format


def placed(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device` in `precision`'s memory format. channels_last converts the convolutions' 4-D
    weights one module at a time: `Module.to(memory_format=...)` would also take NOAH's 5-D grouped weights,
    which have no channels_last layout, and fail."""
    model.to(device)
    memory_format = precision(device)[1]
    if memory_format != torch.contiguous_format:
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.to(memory_format=memory_format)
    return model


def precision_name(device: torch.device) -> str:
    """`bf16` or `fp32`: what `precision` trains `device` in (the run's `precision` tag)."""
    return "bf16" if bf16(device) else "fp32"


def compiles(setting: bool | None, device: torch.device) -> bool:
    """`train.compile` on `device`: null compiles on a GPU (inductor's fused kernels) and not on a CPU (a
    model's compilation there costs more minutes than a smoke trial trains)."""
    return device.type == "cuda" if setting is None else setting


def compiled(model: nn.Module, on: bool) -> nn.Module:
    """`model` through `torch.compile` when `on`. Dynamo traces the NOAH head's autograd function
    (`PocaSum`) through, its backward as written, into the model's one graph on a GPU; on a CPU the fused
    forward's overflow check reads a value (`.item()`), a graph break where the head's pass runs eagerly."""
    return torch.compile(model) if on else model


CUBLAS_DETERMINISTIC = ":4096:8"
"""The cuBLAS workspace setting under which its GEMMs repeat bit for bit (CUDA's reproducibility notes)."""


def set_determinism(device: torch.device, deterministic: bool) -> None:
    """`train.deterministic` for this process, on a GPU: True picks deterministic kernels (cuDNN's
    deterministic algorithms without autotuning, deterministic cuBLAS workspaces, and PyTorch's deterministic
    implementations), so a trial repeats bit for bit on the same kind of GPU; False lets cuDNN time and pick
    its fastest algorithms (`cudnn.benchmark`), which may differ from run to run. TF32 stays at PyTorch's
    defaults either way (the forward passes run under bf16 autocast, `precision`).

    `warn_only=True`: an op with no deterministic CUDA kernel warns, naming itself, rather than failing the
    trial; such an op is where a deterministic run may still differ. Raising would stop every backbone:
    PyTorch flags the backward of global average pooling (timm's `AdaptiveAvgPool2d`) for its atomic adds,
    although at a 1x1 output each input gradient receives exactly one, so it repeats. CUBLAS_WORKSPACE_CONFIG
    is read when a process first uses cuBLAS: set here, before the model's first matmul, it holds for a
    process that trains in one mode (a `train` command, a study's trials). On CPU nothing changes: its
    kernels repeat for a fixed thread count."""
    if device.type != "cuda":
        return
    if deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def train_one_epoch(step: Step, loader: Iterable[Any], tick: Callable[[], None] | None = None) -> dict[str, float]:
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
    wait = 0.0
    stream = iter(loader)
    for i in itertools.count():
        waited = time.perf_counter()
        batch = next(stream, None)
        wait += time.perf_counter() - waited
        if batch is None:
            break
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
            step.ema.update(unwrap(step.model), step=step.updates)
        total += loss.detach()
        correct += (logits.detach().argmax(1) == (y.argmax(1) if y.ndim == 2 else y)).sum()
        images += x.shape[0]
        batches += 1
        if tick is not None:
            tick()
    if step.cuda:
        torch.cuda.synchronize(step.device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(total):
        raise NonFiniteLossError(f"training loss became {total.item()} by update {step.updates}")
    return {"train_loss": total.item() / max(batches, 1), "lr": lr, "images": images, "correct": correct.item(),
            "epoch_seconds": seconds, "data_wait_fraction": wait / seconds,
            "loader_images_per_s": loader.throughput() if isinstance(loader, Loader) else float("nan")}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Loader, world: World) -> dict[str, float]:
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


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside `torch.compile`'s and DistributedDataParallel's wrappers (itself when unwrapped)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
