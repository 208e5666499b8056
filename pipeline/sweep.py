"""Ray Tune sweeps: one grid per paper table, each distinct trial trained once across all tables.

A table's rows become trials (`pipeline.study`); a trial whose identity already has a FINISHED MLflow
run is reused, whatever table trained it. The rest run as one Ray Tune grid on a local Ray or the
cluster at `ray.address` / `RAY_ADDRESS`. A trial resumes from the checkpoint folder named by its
identity, so Ray's retries (`max_failures`) and a re-run of an interrupted sweep pick up where they
stopped; on a multi-node cluster `train.checkpoint_root` and the MLflow store must be shared storage.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import REPO_ROOT
from .config import ConfigError, Params, TrialConfig, flatten, parse, to_dict
from .study import RESULTS, RowTrials, table_rows, trial_key


def _trainable(config: dict[str, Any]) -> None:
    """One Ray Tune trial: train (or resume) through the trainer, reporting every epoch to Tune; the run
    is tagged with the Ray node that trained it. A diverged loss ends the trial without Ray's retries
    (`max_failures` is for lost processes and nodes; a retry would diverge again): its MLflow run is
    already FAILED with the reason."""
    import ray
    from ray import tune

    from .config import MlflowConfig, TrainConfig
    from .tracking import client
    from .train import NonFiniteLossError, run_trial

    trial = parse(TrialConfig, config["trial"], "trial")

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


def connect(params: Params) -> str:
    """Join the cluster at `ray.address` or RAY_ADDRESS, else start a local Ray; returns where."""
    import ray

    address = params.ray.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return "already connected"
    if address:
        ray.init(address=address, log_to_driver=True)
        return address
    ray.init(num_cpus=params.ray.num_cpus, include_dashboard=False, log_to_driver=True)
    return "local"


def tune_trials(params: Params, table: str, trials: dict[str, TrialConfig], parent_run_id: str) -> None:
    """Run `trials` (keyed by identity) as one Ray Tune grid; failures stay in MLflow, not raised."""
    import ray
    from ray import tune

    where = connect(params)
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
            name=f"{table}-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}",
            storage_path=str(storage if storage.is_absolute() else REPO_ROOT / storage),
            failure_config=tune.FailureConfig(max_failures=params.ray.max_failures), verbose=1))
    try:
        tuner.fit()
    finally:
        ray.shutdown()


def _row_result(rt: RowTrials, keys: dict[str, str], uri: str) -> dict[str, Any]:
    """A results row: the head, the table's setting, and each trial's outcome read back from MLflow."""
    from .tracking import latest_run, result_of

    head = rt.row.head
    setting = {"N": head.N, "r": head.r, **head.options()}
    out: dict[str, Any] = {"row": rt.row.row, "backbone": rt.row.backbone, "head": to_dict(head),
                           "head_name": rt.row.head.name, "setting": setting}
    for kind, key in keys.items():
        run = latest_run(key, uri)
        if run is None:
            res = {"status": "MISSING", "reason": "no run was recorded for this trial"}
        else:
            res = result_of(run)
            if res["status"] != "FINISHED" and not res.get("reason"):
                res["reason"] = f"run ended {res['status']}"
        prefix = "" if kind == "classify" else f"{kind}_"
        out.update({f"{prefix}{k}": v for k, v in res.items()})
    return out


def run_table(params: Params, table: str, out_dir: Path = RESULTS) -> dict[str, Any]:
    """Sweep one table: validate, reuse finished trials, tune the rest, write `results/<table>.json|csv`."""
    from .tracking import client, experiment_id, find_finished, git_commit, resolve_uri

    rows = table_rows(params, table)
    out_dir.mkdir(parents=True, exist_ok=True)  # an unusable results folder fails now, not after training
    keys = [{kind: trial_key(t) for kind, t in rt.trials.items()} for rt in rows]
    unique = {ks[kind]: t for rt, ks in zip(rows, keys) for kind, t in rt.trials.items()}
    uri = resolve_uri(params.mlflow.tracking_uri)
    todo = {k: t for k, t in unique.items() if find_finished(k, uri) is None}
    # Fine-tuning starts from a classification trial's checkpoint: train missing ones first.
    sources = {trial_key(t.init_from): t.init_from for t in todo.values() if t.init_from is not None}
    phases = [p for p in ({k: t for k, t in sources.items() if find_finished(k, uri) is None}, todo) if p]
    print(f"sweep {table}: {len(rows)} rows, {len(unique)} unique trials, {len(unique) - len(todo)} already "
          f"finished, {len(todo)} to train", file=sys.stderr, flush=True)
    if phases:
        mlflow_client = client(uri)
        parent = mlflow_client.create_run(experiment_id(mlflow_client, table), run_name=f"{table} sweep",
                                          tags={"sweep": table, "git_commit": git_commit()})
        try:
            for phase in phases:
                tune_trials(params, table, phase, parent.info.run_id)
        finally:
            mlflow_client.set_terminated(parent.info.run_id)
    prof, first = params.active, next(iter(rows[0].trials.values()))  # every row trains on the same data
    meta = {"table": table, "profile": params.profile,
            "dataset": prof.reid_dataset if params.tables[table].task == "reid" else prof.dataset,
            "num_classes": _num_classes(first.data_dir), "img_size": first.img_size, "epochs": prof.epochs,
            "batch_size": prof.batch_size, "recipe": params.tables[table].recipe, "seed": params.seed,
            "commit": git_commit(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    results = {"meta": meta, "rows": [_row_result(rt, ks, uri) for rt, ks in zip(rows, keys)]}
    write_results(out_dir, table, results)
    return results


def _num_classes(data_dir: str) -> int | None:
    from .data.prepare import CLASSES

    path = Path(data_dir) / CLASSES
    return len(json.loads(path.read_text())) if path.is_file() else None


def write_results(out_dir: Path, table: str, results: dict[str, Any]) -> None:
    """`<table>.json` (meta + rows) and `<table>.csv` (rows flattened), each written atomically."""
    import pandas as pd

    from .io import atomic_write_text

    atomic_write_text(out_dir / f"{table}.json", json.dumps(results, indent=2, default=str) + "\n")
    frame = pd.DataFrame([flatten(r) for r in results["rows"]])
    atomic_write_text(out_dir / f"{table}.csv", frame.to_csv(index=False))


def sweep_stage(params: Params, tables: list[str]) -> None:
    """The DVC stage `sweep@TABLE`: `tables` holds the one table to run."""
    if len(tables) != 1:
        raise ConfigError("table", tables, "exactly one key of `tables`: " + ", ".join(params.tables))
    run_table(params, tables[0])
