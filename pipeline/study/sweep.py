"""Ray Tune sweeps: one grid per paper table, each distinct trial trained once across all tables.

A table's rows become trials (`study.tables`); a trial whose identity already has a FINISHED MLflow
run is reused, whatever table trained it. The rest run as one Ray Tune grid on a local Ray or the
cluster at `ray.address` / `RAY_ADDRESS`. A trial resumes from the checkpoint folder named by its
identity, so Ray's retries (`max_failures`) and a re-run of an interrupted sweep pick up where they
stopped; on a multi-node cluster `train.checkpoint_root` and the MLflow store must be shared storage.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import REPO_ROOT
from ..config import RESULTS, ConfigError, MlflowConfig, Params, TrainConfig, TrialConfig, data_dir, parse, to_dict
from ..data.prepared import num_classes, require_prepared
from ..training.engine import NonFiniteLossError
from ..training.record import checkpoint_root
from ..training.run import run_trial
from ..training.tracking import REASON_TAG, client, experiment_id, find_finished, git_commit, resolve_uri
from ..training.trial import Trial, resolve_trial, trial_key
from ..utils.cluster import connect
from ..utils.interrupt import Interrupted
from ..utils.io import require_writable
from ..utils.stage import StageError
from .results import row_result, unfinished, write_results
from .tables import table_rows


def _trainable(config: dict[str, Any]) -> None:
    """One Ray Tune trial: train (or resume) through the trainer, reporting every epoch to Tune; the run
    is tagged with the Ray node that trained it. A diverged loss ends the trial without Ray's retries
    (`max_failures` is for lost processes and nodes; a retry would diverge again): its MLflow run is
    already FAILED with the reason."""
    import ray
    from ray import tune

    trial = resolve_trial(config["trial"], {})  # resolved by the driver: the recipe travels whole

    def report(metrics: dict[str, Any]) -> None:
        tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    tracking = parse(MlflowConfig, config["mlflow"], "mlflow")
    try:
        result = run_trial(trial, train=parse(TrainConfig, config["train"], "train"), tracking=tracking,
                           experiment=config["experiment"], parent_run_id=config["parent_run_id"], on_epoch=report)
    except NonFiniteLossError as err:
        print(f"trial {trial.backbone}/{trial.head.name} failed, not retried: {err}", file=sys.stderr, flush=True)
        tune.report({"diverged": 1})
        return
    client(tracking.tracking_uri).set_tag(result["run_id"], "ray_node_id", ray.get_runtime_context().get_node_id())
    report(result | {"done": 1})


def _trial_name(trial: Any) -> str:
    """`resnet18-noah(N4_r0.5)-00001`: readable in Ray's progress table and folders."""
    cfg = trial.config["trial"]
    head = parse(TrialConfig, cfg, "trial").head.name
    return f"{cfg['backbone']}-{head}-{trial.trial_id[-5:]}".replace(",", "_").replace("=", "")


def _resources(params: Params) -> Any:
    """Per-trial resources: one bundle, or one per Ray Train worker when a trial is data-parallel."""
    from ray import tune

    ray_cfg, workers = params.ray, params.train.num_workers
    if workers == 1:
        return {"cpu": ray_cfg.cpus_per_trial, "gpu": ray_cfg.gpus_per_trial}
    worker = {"CPU": ray_cfg.cpus_per_trial, "GPU": ray_cfg.gpus_per_trial}
    return tune.PlacementGroupFactory([{"CPU": 0.5}] + [worker] * workers)


def tune_trials(params: Params, table: str, trials: dict[str, Trial], parent_run_id: str) -> dict[str, str]:
    """Run `trials` (keyed by identity) as one Ray Tune grid; failures stay in MLflow, not raised. Returns the
    error of each trial that Ray saw fail for good, by identity (a trial can fail before its run exists)."""
    import ray
    from ray import tune

    where = connect(params.ray.address, params.ray.num_cpus)
    print(f"sweep {table}: {len(trials)} trial(s) on Ray ({where})", file=sys.stderr, flush=True)
    space = {
        "trial": tune.grid_search([to_dict(t) for t in trials.values()]),
        "train": to_dict(params.train), "mlflow": to_dict(params.mlflow),
        "experiment": table, "parent_run_id": parent_run_id,
    }
    storage = Path(params.ray.storage_path)
    tuner = tune.Tuner(
        tune.with_resources(_trainable, _resources(params)), param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=params.ray.max_concurrent,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(
            name=f"{table}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}",
            storage_path=str(storage if storage.is_absolute() else REPO_ROOT / storage),
            failure_config=tune.FailureConfig(max_failures=params.ray.max_failures), verbose=1))
    try:
        with _sigterm_stops_tune() as stopped:
            grid = tuner.fit()
    finally:
        ray.shutdown()
    if stopped:
        raise Interrupted(stopped[0])
    keys = {json.dumps(to_dict(t), sort_keys=True): k for k, t in trials.items()}
    return {keys[json.dumps(r.config["trial"], sort_keys=True)]: _error_text(r.error) for r in grid if r.error}


@contextlib.contextmanager
def _sigterm_stops_tune() -> Iterator[list[int]]:
    """SIGTERM stops the Tune run as Ctrl-C does (Tune ends its trials and returns), and is raised as
    `Interrupted` once Tune has returned. `ray.init` replaced this process's SIGTERM handler with one that
    exits from inside Ray's own calls (or aborts); an exception raised there is not one Ray can pass on."""
    stopped: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        stopped.append(signum)
        signal.raise_signal(signal.SIGINT)  # Tune's own handler: stop the trials, save, return

    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGTERM, previous)


def _error_text(error: BaseException) -> str:
    """`Type: message` of the error a trial raised (Ray wraps it in its own task error)."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:500]


def run_table(params: Params, table: str, out_dir: Path = RESULTS) -> dict[str, Any]:
    """Sweep one table: validate, reuse finished trials, tune the rest, write `results/<table>.json|csv`."""
    rows = table_rows(params, table)
    uri = resolve_uri(params.mlflow.tracking_uri)
    check_ready(params, table, out_dir, uri)
    keys = [{kind: trial_key(t) for kind, t in rt.trials.items()} for rt in rows]
    unique = {ks[kind]: t for rt, ks in zip(rows, keys) for kind, t in rt.trials.items()}
    todo = {k: t for k, t in unique.items() if find_finished(k, uri) is None}
    # Fine-tuning starts from a classification trial's checkpoint: train missing ones first.
    sources = {trial_key(t.init_from): t.init_from for t in todo.values() if t.init_from is not None}
    phases = [p for p in ({k: t for k, t in sources.items() if find_finished(k, uri) is None}, todo) if p]
    print(f"sweep {table}: {len(rows)} rows, {len(unique)} unique trials, {len(unique) - len(todo)} already "
          f"finished, {len(todo)} to train", file=sys.stderr, flush=True)
    errors: dict[str, str] = {}
    if phases:
        mlflow_client = client(uri)
        parent = mlflow_client.create_run(experiment_id(mlflow_client, table), run_name=f"{table} sweep",
                                          tags={"sweep": table, "git_commit": git_commit()})
        ended = "KILLED"  # unless it ends otherwise: interrupted (SIGINT, SIGTERM)
        try:
            for phase in phases:
                errors |= tune_trials(params, table, phase, parent.info.run_id)
            ended = "FINISHED"
        except Exception:
            ended = "FAILED"
            raise
        finally:
            _close_sweep(mlflow_client, parent.info, ended)
    prof, first = params.active, next(iter(rows[0].trials.values()))  # every row trains on the same data
    meta = {"table": table, "profile": params.profile,
            "dataset": prof.reid_dataset if params.tables[table].task == "reid" else prof.dataset,
            "num_classes": num_classes(first.data_dir), "img_size": first.img_size, "epochs": prof.epochs,
            "batch_size": prof.batch_size, "recipe": params.tables[table].recipe, "seed": params.seed,
            "commit": git_commit(), "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    results = {"meta": meta, "rows": [row_result(rt, ks, uri, errors) for rt, ks in zip(rows, keys)]}
    write_results(out_dir, table, results)
    failed = unfinished(results["rows"])
    if failed:
        raise StageError(f"{table}: {len(failed)} trial(s) did not finish ({'; '.join(failed)}); their reasons are "
                         f"in {out_dir / table}.json and MLflow; run the stage again to retry them")
    return results


def _close_sweep(mlflow_client: Any, parent: Any, status: str) -> None:
    """End the sweep's parent run with `status`, and as KILLED, with a reason, every trial run of it still
    RUNNING: its process was ended with the sweep (a re-run reopens the run and resumes the trial)."""
    left = mlflow_client.search_runs([parent.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent.run_id}' and attributes.status = 'RUNNING'"))
    for run in left:
        mlflow_client.set_tag(run.info.run_id, REASON_TAG, f"interrupted: the sweep ended {status}")
        mlflow_client.set_terminated(run.info.run_id, "KILLED")
    mlflow_client.set_terminated(parent.run_id, status)


def check_ready(params: Params, table: str, out_dir: Path, uri: str) -> None:
    """Fail in seconds, before Ray starts, on what would fail every trial or lose its result: unprepared
    data, a results, checkpoint or Ray folder that cannot be written, an MLflow store that cannot be used."""
    prof = params.active
    for name in (prof.dataset, prof.reid_dataset if params.tables[table].task == "reid" else None):
        if name is not None:
            try:
                require_prepared(data_dir(params, name))
            except ConfigError as err:
                raise ConfigError(f"datasets.{name}.out", err.value, err.allowed) from None
    for key, folder in (("results", out_dir), ("train.checkpoint_root", checkpoint_root(params.train.checkpoint_root)),
                        ("ray.storage_path", REPO_ROOT / params.ray.storage_path)):
        require_writable(folder, key)
    try:
        client(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - whatever it is, it would fail every trial once Ray started
        raise ConfigError("mlflow.tracking_uri", uri, f"a usable MLflow store ({type(err).__name__}: {err})") from None


def sweep_stage(params: Params, tables: list[str]) -> None:
    """The DVC stage `sweep@TABLE`: `tables` holds the one table to run."""
    if len(tables) != 1:
        raise ConfigError("table", tables, "exactly one key of `tables`: " + ", ".join(params.tables))
    run_table(params, tables[0])
