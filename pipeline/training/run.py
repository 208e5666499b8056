"""Run one trial (`run_trial`): the entry every study trial and `python -m pipeline train` call.

The run is tracked in MLflow (`tracking`), checkpointed atomically after every epoch (`record`) and resumed
from the last checkpoint when started again; once FINISHED, its checkpoint keeps the final weights only.
Each epoch is seeded from (seed, epoch), so a resumed run repeats what an uninterrupted one would have done,
bit for bit on the same kind of machine, which every run records (`utils.machine`; MLflow tags
`machine.*`). A damaged or foreign checkpoint is set aside and the trial starts from scratch in a new run;
the run it replaces (as `--retrain` does) names its successor in a `superseded_by` tag and, if a killed
process left it RUNNING, ends KILLED.

With `TrainConfig.num_workers > 1` the same loop (`fit`) runs data-parallel in Ray Train's TorchTrainer
(gloo on CPU, NCCL on GPU) with the same global batch; only rank 0 writes checkpoints and logs to MLflow.
"""
from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn

from ..config import ConfigError, MlflowConfig, TrainConfig, flatten, to_dict
from ..data.loaders import Loader, build_loader
from ..data.lock import data_lock
from ..data.prepared import check_shards, manifest_hash, read_meta, train_images
from ..models.complexity import count
from ..utils.cluster import connect, process_cpus
from ..utils.interrupt import Interrupted, interruptible
from ..utils.machine import fixed_threads, machine_facts
from ..utils.progress import resolve_mode, steps, ticker
from ..utils.seeds import mix_seed, seed_everything
from .engine import (
    Step,
    World,
    compiled,
    compiles,
    placed,
    precision_name,
    set_determinism,
    train_one_epoch,
    unwrap,
)
from .recipes import build_criterion, build_mixup, build_optimizer, build_scheduler, unapplied
from .record import (
    CHECKPOINT,
    RESULT,
    RUN_ID_FILE,
    checkpoint_of,
    clear,
    compact,
    load_checkpoint,
    read_result,
    read_run_id,
    reject_bad_checkpoint,
    save_checkpoint,
    trial_folder,
    trial_lock,
    write_config,
    write_result,
)
from .tasks import Task, task_of
from .tracking import (
    TrialRun,
    end_superseded,
    find_finished,
    git_commit,
    metrics_csv,
    plot_learning_curves,
    resolve_uri,
    result_of,
)
from .trial import TRAINING_CODE_VERSION, Trial, trial_id

EpochCallback = Callable[[dict[str, float]], None]


@dataclass(frozen=True)
class Job:
    """Everything a training process needs (plain, picklable data: sent to Ray Train workers)."""

    trial: Trial
    task: Task
    train: TrainConfig
    trial_id: str
    checkpoint_dir: str
    tracking_uri: str
    run_id: str
    num_classes: int
    log_weights: bool
    init_from: str | None = None
    """The trial id of the classification trial whose checkpoint initialises a fine-tuned backbone."""


SMALL_SPLIT = 2000
"""Below this many training images a null `loader_workers` means none: starting the processes costs more
than decoding such a split in the training process (the embedded study's 320-image split)."""


def loader_workers(train: TrainConfig, images: int) -> int:
    """`train.loader_workers`, or when null the CPUs this training process has (its Ray share inside Ray)
    minus one for the training loop itself (none for a split of under `SMALL_SPLIT` images)."""
    if train.loader_workers is not None:
        return train.loader_workers
    return 0 if images < SMALL_SPLIT else max(0, process_cpus() - 1)


def worker_cpus(train: TrainConfig, use_gpu: bool, resources: dict[str, float]) -> int:
    """CPUs each Ray Train worker asks for: its loader workers plus one, or with a null `loader_workers` on
    GPUs the cluster's CPUs per GPU (so the decoding processes that keep a GPU fed have cores), else one."""
    if train.loader_workers is not None:
        return train.loader_workers + 1
    if use_gpu:
        return max(1, int(resources.get("CPU", 1) // max(resources.get("GPU", 1), 1)))
    return 1


def device_decode(train: TrainConfig, trial: Trial, device: torch.device) -> bool:
    """Whether JPEGs are decoded on the training device (`train.decode`; auto: on a GPU, for the standard
    augmentation that `Augment` can apply there)."""
    if train.decode == "gpu" and device.type != "cuda":
        raise ConfigError("decode", "gpu", "auto or cpu on a process without a CUDA GPU")
    return train.decode == "gpu" or (train.decode == "auto" and device.type == "cuda"
                                     and trial.recipe.augment.kind == "standard")


def _loaders(job: Job, world: World) -> tuple[Loader, ...]:
    """The train loader and the task's evaluation loaders; with several workers each trains on its shard
    with batch / workers (and evaluates its shard where the task sums counts over workers). Every loader takes
    the recipe's `augment`: the evaluation crop and the input mean/std are the recipe's too."""
    trial, train = job.trial, job.train
    if trial.batch_size % world.size:
        raise ConfigError("batch_size", trial.batch_size, f"a multiple of num_workers ({world.size})")
    batch = trial.batch_size // world.size
    workers = loader_workers(train, train_images(trial.data_dir) or 0)
    on_device = device_decode(train, trial, world.device)
    sharded = 2 if job.task.shard_eval else 1
    return tuple(build_loader(trial.data_dir, split, trial.img_size, batch, train=i == 0,
                              augment=trial.recipe.augment, workers=workers, seed=trial.seed,
                              device=world.device, device_decode=on_device,
                              rank=world.rank if i < sharded else 0, world_size=world.size if i < sharded else 1)
                 for i, split in enumerate(["train", *job.task.eval_splits]))


def fit(job: Job, world: World, on_epoch: EpochCallback | None = None,
        wrap: Callable[[nn.Module], nn.Module] | None = None) -> dict[str, Any]:
    """Train `job` from its last checkpoint to the end and evaluate it; rank 0 checkpoints and logs.

    The process trains in `train.deterministic`'s mode and with one torch thread per CPU it has
    (`process_cpus`: its Ray share inside Ray, else its affinity mask), set for every trial rather than left
    to how the process started, since float reductions, and with them the result, depend on the thread
    count. `wrap` makes the data-parallel model (Ray Train's prepare_model) when there are several workers."""
    set_determinism(world.device, job.train.deterministic)
    with fixed_threads(process_cpus()):
        return _fit(job, world, on_epoch, wrap)


def _fit(job: Job, world: World, on_epoch: EpochCallback | None,
         wrap: Callable[[nn.Module], nn.Module] | None) -> dict[str, Any]:
    """`fit`'s steps in order: build the model, resume it from its checkpoint, make the loaders and the training
    step, tag the run (rank 0); then each remaining epoch trains, evaluates and is recorded; last, the result is
    reported (rank 0; other ranks return {})."""
    trial, lead = job.trial, world.rank == 0
    built = _build(job, world, lead)
    history, start_epoch = _resume(job, built, lead)
    train_loader, *eval_loaders = _loaders(job, world)
    step, compiling = _training_step(job, world, built, start_epoch, len(train_loader), wrap)
    run = _open_run(job, world, compiling, history) if lead else None
    mode = resolve_mode(job.train.progress) if lead else "off"
    name = f"{trial.backbone}/{trial.head.name} epoch"
    done = steps(trial.epochs, name, mode)
    for epoch in range(start_epoch, trial.epochs):
        row = _train_epoch(step, train_loader, world, trial.seed, epoch, f"{name} {epoch + 1}/{trial.epochs}", mode)
        row.update(_evaluate(job.task, step, eval_loaders, world))
        history.append(row)
        if run is not None:
            _record_epoch(job, run, step, epoch, history, done)
            if on_epoch is not None:
                on_epoch(row)
    if run is None:
        return {}
    return _report(job, run, history, built, unwrap(step.model))


@dataclass(frozen=True)
class _Built:
    """A trial's model on its device, what trains it and its size (counted by rank 0 only; 0 elsewhere)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: ModelEmaV3 | None
    params: int
    madds: int


def _build(job: Job, world: World, lead: bool) -> _Built:
    """The trial's model, built under the trial's seed and placed on the device, its optimizer and EMA copy."""
    trial, recipe = job.trial, job.trial.recipe
    seed_everything(mix_seed(trial.seed, 0))
    model = job.task.build_model(trial, job.num_classes)
    params, madds = count(model, img_size=trial.img_size) if lead else (0, 0)
    placed(model, world.device)
    optimizer = build_optimizer(model, trial.scaled)
    ema = ModelEmaV3(model, decay=recipe.ema_decay) if recipe.ema_decay else None
    return _Built(model, optimizer, ema, params, madds)


def _resume(job: Job, built: _Built, lead: bool) -> tuple[list[dict[str, float]], int]:
    """Load the trial's checkpoint, if any, into `built`, or else initialise a fine-tuned model from the trial it
    starts from; returns the epochs' history and the number of epochs done."""
    folder = Path(job.checkpoint_dir)
    state = load_checkpoint(folder / CHECKPOINT, job.trial_id)
    if state is None:
        if job.init_from is not None:
            job.task.initialise(built.model, checkpoint_of(job.train.checkpoint_root, job.init_from), job.init_from)
        return [], 0
    built.model.load_state_dict(state["model"])
    if "optimizer" in state:  # absent once compacted: a finished trial, whose epochs all ran
        built.optimizer.load_state_dict(state["optimizer"])
        if built.ema is not None:
            built.ema.module.load_state_dict(state["ema"])
    history, start_epoch, trial = state["history"], state["epoch"], job.trial
    if lead:  # why the first epoch shown is not 1
        where = (f"from epoch {start_epoch + 1}/{trial.epochs}" if start_epoch < trial.epochs else
                 f"after its last epoch ({trial.epochs}/{trial.epochs}): recording its result")
        print(f"resuming {trial.label} {where} (checkpoint {folder / CHECKPOINT})", file=sys.stderr, flush=True)
    return history, start_epoch


def _training_step(job: Job, world: World, built: _Built, start_epoch: int, batches: int,
                   wrap: Callable[[nn.Module], nn.Module] | None) -> tuple[Step, bool]:
    """What one epoch trains with (the model compiled where `train.compile` says, and wrapped by `wrap`; its lr
    schedule at the update `start_epoch` left it, for `batches` updates an epoch), and whether it compiles."""
    trial, recipe = job.trial, job.trial.recipe
    mixup = build_mixup(recipe, job.num_classes)
    compiling = compiles(job.train.compile, world.device)
    model = built.model
    step = Step(model=compiled(wrap(model) if wrap else model, compiling), optimizer=built.optimizer,
                scheduler=build_scheduler(built.optimizer, trial.scaled, batches),
                criterion=build_criterion(recipe, mixup), device=world.device, mixup=mixup, ema=built.ema,
                clip_grad=recipe.clip_grad, updates=start_epoch * batches)
    step.scheduler.step_update(num_updates=step.updates)
    return step, compiling


def _open_run(job: Job, world: World, compiling: bool, history: list[dict[str, float]]) -> TrialRun:
    """The trial's MLflow run, tagged with how this process trains it (device, precision, loaders, machine),
    with the epochs checkpointed before a crash but not yet logged."""
    trial = job.trial
    run = TrialRun(job.tracking_uri, job.run_id)
    device = torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else "cpu"
    run.set_tags({"world_size": world.size, "device": device, "precision": precision_name(world.device),
                  "compiled": str(compiling).lower(),
                  "loader_workers": loader_workers(job.train, train_images(trial.data_dir) or 0),
                  "decode": "device" if device_decode(job.train, trial, world.device) else "cpu"})
    run.set_machine(machine_facts(world.device, job.train.deterministic, world.size))
    run.log_epochs(history)
    return run


def _train_epoch(step: Step, loader: Loader, world: World, seed: int, epoch: int, label: str,
                 mode: str) -> dict[str, float]:
    """Train one epoch, seeded from (`seed`, `epoch`, rank); its training metrics, summed over the workers."""
    seed_everything(mix_seed(seed, epoch, world.rank))
    loader.set_epoch(epoch)
    step.scheduler.step(epoch)  # a per-epoch schedule's lr for this epoch (per-update ones ignore it)
    with ticker(len(loader), label, mode) as tick:
        stats = train_one_epoch(step, loader, tick)
    images, correct = world.sum([stats["images"], stats["correct"]])
    # train_top1 is against the (mixed) targets' argmax: Fig. 3's training curve, under augmentation
    return {"epoch": float(epoch), "train_loss": stats["train_loss"], "lr": stats["lr"],
            "train_top1": 100.0 * correct / max(images, 1),
            "images_per_s_epoch": images / stats["epoch_seconds"], "epoch_seconds": stats["epoch_seconds"],
            "data_wait_fraction": stats["data_wait_fraction"], "loader_images_per_s": stats["loader_images_per_s"]}


def _evaluate(task: Task, step: Step, loaders: list[Loader], world: World) -> dict[str, float]:
    """The task's validation metrics of the model (`val_*`) and of its EMA copy (`val_*_ema`) where it has one."""
    row = {f"val_{k}": v for k, v in task.validate(step.model, loaders, world).items()}
    if step.ema is not None:
        row.update({f"val_{k}_ema": v for k, v in task.validate(step.ema.module, loaders, world).items()})
    return row


def _record_epoch(job: Job, run: TrialRun, step: Step, epoch: int, history: list[dict[str, float]],
                  done: Callable[[int, str], None]) -> None:
    """Checkpoint the epoch just trained (atomically), log its metrics to the run and show its line."""
    row = history[-1]
    save_checkpoint(Path(job.checkpoint_dir) / CHECKPOINT, {
        "epoch": epoch + 1, "history": history, "trial_id": job.trial_id,
        "model": unwrap(step.model).state_dict(), "optimizer": step.optimizer.state_dict(),
        "ema": step.ema.module.state_dict() if step.ema is not None else None})
    run.log_epochs([row])
    done(epoch + 1, f"loss {row['train_loss']:.4f} lr {row['lr']:.3g} top1 {row['val_top1']:.2f} "
                    f"top5 {row['val_top5']:.2f} {row['images_per_s_epoch']:.0f} img/s "
                    f"{row['epoch_seconds']:.1f}s")


def _report(job: Job, run: TrialRun, history: list[dict[str, float]], built: _Built,
            model: nn.Module) -> dict[str, Any]:
    """The trial's result (last and best epochs, size, speed), logged to the run with its artifacts and written
    to the trial's folder."""
    last = history[-1]
    result = {"top1": last["val_top1"], "top5": last["val_top5"],
              "best_top1": max(row["val_top1"] for row in history), "params": built.params, "madds": built.madds,
              "train_seconds": sum(row["epoch_seconds"] for row in history),
              "images_per_s": sum(row["images_per_s_epoch"] for row in history) / len(history),
              **{key: last[f"val_{key}"] for key in job.task.result_keys}}
    if built.ema is not None:
        result.update(top1_ema=last["val_top1_ema"], top5_ema=last["val_top5_ema"])
    run.log_final(result)
    _log_artifacts(run, job, history, model)
    write_result(Path(job.checkpoint_dir), result)
    return result


def _log_artifacts(run: TrialRun, job: Job, history: list[dict[str, float]], model: nn.Module) -> None:
    """The resolved config (also kept in the trial's folder), the metrics CSV, the learning curves and
    (when asked) the weights."""
    run.log_artifact(write_config(Path(job.checkpoint_dir), resolved_config(job)))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "metrics.csv").write_text(metrics_csv(history))
        plot_learning_curves(folder / "learning_curve.png", history, f"{job.trial.label} ({job.task.name})")
        for name in ("metrics.csv", "learning_curve.png"):
            run.log_artifact(folder / name)
        if job.log_weights:
            torch.save(model.state_dict(), folder / "weights.pt")
            run.log_artifact(folder / "weights.pt", "weights")


def resolved_config(job: Job) -> dict[str, Any]:
    """The trial as it ran: the resolved trial, the recipe fitted to it, its task and how it ran."""
    scaled = {k: v for k, v in to_dict(job.trial.scaled).items() if k != "recipe"}
    return {"trial_id": job.trial_id, "training_code_version": TRAINING_CODE_VERSION,
            "trial": to_dict(job.trial), "scaled": scaled, "train": to_dict(job.train),
            "data": {"task": job.task.name, "num_classes": job.num_classes,
                     "manifest_hash": manifest_hash(job.trial.data_dir)}}


def _ray_worker(config: dict[str, Any]) -> None:
    """The per-worker entry of Ray Train's TorchTrainer."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    world = World(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())
    fit(config["job"], world, wrap=lambda m: ray.train.torch.prepare_model(m, move_to_device=False))


def _fit_ray(job: Job) -> dict[str, Any]:
    """Run `fit` on `num_workers` Ray Train workers (in the Ray this process is connected to, else the
    cluster at RAY_ADDRESS, else a local Ray on loopback)."""
    connect()
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig, WorkerGroupError
    from ray.train.torch import TorchTrainer

    use_gpu = job.train.use_gpu
    resources = ray.cluster_resources()
    if use_gpu is None:
        use_gpu = resources.get("GPU", 0) >= job.train.num_workers
    folder = Path(job.checkpoint_dir)
    (folder / RESULT).unlink(missing_ok=True)
    trainer = TorchTrainer(
        _ray_worker, train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=job.train.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": worker_cpus(job.train, use_gpu, resources)}),
        run_config=RunConfig(name=f"train-{job.trial_id}", storage_path=str(folder / "ray"),
                             failure_config=FailureConfig(max_failures=0)))
    try:
        trainer.fit()
    except WorkerGroupError as err:  # surface rank 0's own error (e.g. NonFiniteLossError), as with 1 worker
        cause = err.worker_failures.get(0) or next(iter(err.worker_failures.values()), None)
        if isinstance(cause, Exception):
            raise cause from err
        raise
    return read_result(folder)


def _device(train: TrainConfig) -> torch.device:
    if train.use_gpu is False or not torch.cuda.is_available():
        if train.use_gpu:
            raise ConfigError("use_gpu", True, "false or null on a machine without a CUDA GPU")
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def run_trial(trial: Trial, *, train: TrainConfig = TrainConfig(), tracking: MlflowConfig = MlflowConfig(),
              experiment: str = "noah", parent_run_id: str | None = None, tags: Mapping[str, str] | None = None,
              checkpoint_dir: str | Path | None = None, reuse: bool = True,
              on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    """Train and evaluate one trial, tracked as one MLflow run; returns its final metrics.

    A trial whose identity already has a FINISHED run is not trained again. Otherwise it resumes from
    the last checkpoint in `checkpoint_dir` (default `<checkpoint_root>/<trial_id>`) and the same MLflow
    run, if they are this trial's (a damaged or foreign checkpoint is set aside and noted in the new run's
    `checkpoint_rejected` tag). `reuse=False` ignores both and trains from scratch into a new run. While another
    process trains the same trial into the same folder (another experiment of the repository), this one waits
    for it, then reuses its run. The dataset is held for reading throughout (`data.lock`: prepare cannot replace
    it, so the manifest hash the run records is that of the data it read) and its shards' sizes are checked
    first. Any error ends the run FAILED with the error text as its `failure_reason` tag;
    SIGTERM or SIGINT ends it KILLED (in the main thread; raises `Interrupted`).
    `on_epoch` gets each epoch's metrics (in the rank-0 process), e.g. to report to Ray Tune; `tags` are set
    on the run, new or reopened (the study's tables, rows and profile).
    """
    with data_lock(trial.data_dir, exclusive=False, key="data_dir"):  # prepare cannot replace it under us
        check_shards(trial.data_dir)
        classes, stats = read_meta(trial.data_dir)
        task = task_of(stats)
        check_model(trial, task, len(classes), train.num_workers)
        folder = (Path(checkpoint_dir).absolute() if checkpoint_dir
                  else trial_folder(train.checkpoint_root, trial_id(trial)))
        with trial_lock(folder, trial.label):  # another process training this trial finishes it first
            return _run_trial(trial, task, len(classes), folder, train, tracking, experiment, parent_run_id, tags,
                              reuse, on_epoch)


def check_model(trial: Trial, task: Task, num_classes: int, workers: int) -> None:
    """Build the trial's model on the meta device (no memory, no time) and check its batch, so that a head the
    backbone cannot take or a batch it cannot train on fails before anything is written to MLflow or the
    checkpoint root."""
    batch = trial.batch_size // workers
    if (trial.recipe.mixup > 0 or trial.recipe.cutmix > 0) and batch % 2:
        raise ConfigError("batch_size", trial.batch_size, "an even batch per worker (Mixup/CutMix pair images)")
    with torch.device("meta"):
        model = task.build_model(trial, num_classes)
    if batch < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise ConfigError("batch_size", trial.batch_size, f"at least 2 images per worker for {trial.backbone} (its "
                          "BatchNorm layers cannot normalise a batch of one)")


def _run_trial(trial: Trial, task: Task, num_classes: int, folder: Path, train: TrainConfig, tracking: MlflowConfig,
               experiment: str, parent_run_id: str | None, tags: Mapping[str, str] | None, reuse: bool,
               on_epoch: EpochCallback | None) -> dict[str, Any]:
    """`run_trial` under the lock of the trial's folder."""
    tid = trial_id(trial)
    uri = resolve_uri(tracking.tracking_uri)
    if reuse and (done := find_finished(tid, uri)) is not None:
        # said aloud: a command that returns at once with old metrics would otherwise look like a bug
        print(f"reusing finished run {done.info.run_id} of {trial.label} (trial {tid}; --retrain trains again)",
              file=sys.stderr, flush=True)
        return result_of(done)
    source_id = trial_id(trial.init_from) if trial.init_from is not None else None
    if source_id is not None and not (source := checkpoint_of(train.checkpoint_root, source_id)).is_file():
        raise ConfigError("init_from", source_id, f"a trained classification trial (no checkpoint at {source}; "
                          "run that trial first)")
    previous = read_run_id(folder)  # superseded if a new run starts below
    rejected = reject_bad_checkpoint(folder, tid)  # before --retrain deletes: only this trial's own goes
    if not reuse:
        clear(folder)
    if rejected is not None:  # training starts from scratch: into a new run, not over the old run's epochs
        (folder / RUN_ID_FILE).unlink(missing_ok=True)
        print(f"warning: checkpoint rejected, training from scratch: {rejected}", file=sys.stderr)
    device = _device(train) if train.num_workers == 1 else torch.device("cpu")
    commit = git_commit()
    run_tags = {"trial_id": tid, "git_commit": commit, "mlflow.source.git.commit": commit,
                "data_manifest_hash": manifest_hash(trial.data_dir), "backbone": trial.backbone,
                "head": trial.head.name, "recipe": trial.recipe.name, "task": task.name}
    if not_applied := unapplied(trial.recipe):
        run_tags["recipe_not_applied"] = ", ".join(not_applied) + " (no such parameter in this backbone)"
    run = TrialRun.open(uri, experiment, folder, run_name=trial.label, tags=run_tags, parent_run_id=parent_run_id)
    if previous is not None and previous != run.run_id:
        if rejected is not None:
            why = f"its checkpoint was rejected ({rejected})"
        else:
            why = "retrained (--retrain)" if not reuse else f"its checkpoint folder {folder} was another trial's"
        end_superseded(uri, previous, run.run_id, why)
    job = Job(trial=trial, task=task, train=train, trial_id=tid, checkpoint_dir=str(folder), tracking_uri=uri,
              run_id=run.run_id, num_classes=num_classes, log_weights=tracking.log_weights, init_from=source_id)
    try:
        with interruptible():
            run.set_tags({**(tags or {}), **({"checkpoint_rejected": rejected} if rejected is not None else {})})
            run.log_params(flatten(resolved_config(job)))
            if train.num_workers == 1:
                result = fit(job, World(device=device), on_epoch)
            else:
                result = _fit_ray(job)
    except Exception as err:
        run.fail(f"{type(err).__name__}: {err}")
        raise
    except BaseException as err:
        run.fail(f"interrupted: {err if isinstance(err, Interrupted) else type(err).__name__}", killed=True)
        raise
    run.finish()
    compact(folder, tid)  # after finish: a crash before it leaves the full checkpoint, which still resumes
    return {**result, "run_id": run.run_id, "trial_id": tid, "status": "FINISHED", "reason": None,
            "machine": result_of(run.run())["machine"]}
