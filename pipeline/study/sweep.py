"""The study: every trial the selected tables need, scheduled as one Ray Tune run.

The tables' rows become trials (`study.tables`); one identity is one trial, whatever tables share it, and
one with a FINISHED MLflow run is reused. The rest run in one Ray Tune run on one Ray connection (a local
Ray, or the cluster at `ray.address` / `RAY_ADDRESS`), handed out by `TrialQueue` longest chain first
(`study.schedule`), a re-identification fine-tuning trial as soon as the classification trial it starts
from has finished. A trial resumes from the checkpoint folder named by its identity, so Ray's retries
(`max_failures`) and a re-run of an interrupted study pick up where they stopped; on a multi-node cluster
`train.checkpoint_root` and the MLflow store must be shared storage. Each table's results are then read
back from MLflow into `results/<table>.json|csv` (`results/study/` for the tables of `study.tables`, the study
stage's out folder: `config.results_dir`) and into each table's row runs (`study.table_runs`), under
the table's one parent run; a trial that failed is a row without a result (and is listed at the end), not a
failed study.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.search import Searcher

from .. import REPO_ROOT
from ..config import ConfigError, MlflowConfig, Params, TrainConfig, data_dir, parse, results_dir, to_dict
from ..data.prepared import check_shards, num_classes, require_prepared
from ..training.engine import NonFiniteLossError
from ..training.record import checkpoint_root, trial_lock
from ..training.run import run_trial
from ..training.tasks import chance_levels
from ..training.tracking import TrialRun, check_store, client, git_commit, resolve_uri, running_runs
from ..training.trial import resolve_trial, trial_key
from ..utils.cluster import connect
from ..utils.interrupt import Interrupted
from ..utils.io import require_writable
from .clean import apply as apply_clean
from .clean import needed_sources, plan_clean
from .cost import Measured, read_measured, trial_hours
from .results import row_result, unfinished, write_results
from .rows import RowTrials, StudyTrial, departures, study_trials, table_order, table_rows
from .schedule import Job, by_priority
from .table_runs import close_parent, sweep_parents, tag_trial_runs, trial_tags, write_row_runs

NEW_OUTPUT = "RAY_AIR_NEW_OUTPUT"
"""Ray Tune's switch between its two console reporters: "0", the classic one, prints nothing at verbosity 0
(the newer prints an experiment header and paths even then)."""
TUNE_SIGINT = "TUNE_DISABLE_SIGINT_HANDLER"


def _trainable(config: dict[str, Any]) -> None:
    """One Ray Tune trial: train (or resume) through the trainer, reporting every epoch to Tune; the run
    is tagged with the Ray node that trained it. A diverged loss ends the trial without Ray's retries
    (`max_failures` is for lost processes and nodes; a retry would diverge again): its MLflow run is
    already FAILED with the reason."""
    trial = resolve_trial(config["trial"], {})  # resolved by the driver: the recipe travels whole

    def report(metrics: dict[str, Any]) -> None:
        tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    tracking = parse(MlflowConfig, config["mlflow"], "mlflow")
    try:
        result = run_trial(trial, train=parse(TrainConfig, config["train"], "train"), tracking=tracking,
                           experiment=config["experiment"], parent_run_id=config["parent_run_id"], tags=config["tags"],
                           on_epoch=report)
    except NonFiniteLossError as err:
        print(f"trial {trial.label} failed, not retried: {err}", file=sys.stderr, flush=True)
        tune.report({"diverged": 1})
        return
    client(tracking.tracking_uri).set_tag(result["run_id"], "ray_node_id", ray.get_runtime_context().get_node_id())
    report(result | {"finished": 1})


class TrialQueue(Searcher):
    """Hands Ray Tune the study's trials in `ranked` order, each once its source trial has FINISHED, and
    records how each ended; a trial whose source did not finish is never started. FINISHED (for Tune) once
    nothing is left to hand out."""

    def __init__(self, trials: dict[str, StudyTrial], ranked: list[str], space: dict[str, dict[str, Any]]):
        super().__init__()
        self.trials, self.waiting, self.space = trials, list(ranked), space
        self.running: dict[str, str] = {}  # Tune trial id -> identity

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # the queue has no search space of its own: Tune's param_space is merged in

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: a re-run finds the finished trials in MLflow, and resumes the others' checkpoints."""

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        for key in self.waiting:
            after = self.trials[key].after
            if after is None or self.trials[after].status == "FINISHED":
                self.waiting.remove(key)
                self.running[trial_id] = key
                self.trials[key].ran = True
                return {"key": key, "trial": to_dict(self.trials[key].trial), **self.space[key]}
        return Searcher.FINISHED if not self.waiting else None  # None: wait for a source to finish

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        st = self.trials[self.running.pop(trial_id)]
        result = result or {}
        st.seconds = result.get("time_total_s")
        if result.get("finished") and not error:
            st.status, st.top1 = "FINISHED", result.get("top1")
            return
        st.status = "FAILED"
        if result.get("diverged"):
            st.reason = "NonFiniteLossError: the training loss became NaN or infinite"
        for other in list(self.waiting):
            if self.trials[other].after == st.key:
                self.waiting.remove(other)
                self.trials[other].status, self.trials[other].reason = "BLOCKED", f"its source trial {st.key} failed"


class TrialLines(tune.Callback):
    """The study's console in place of Ray Tune's status tables: a line when a trial starts, one per epoch,
    one when it ends, with its top-1 and time or why it failed."""

    def __init__(self, trials: dict[str, StudyTrial]):
        self.trials, self.ended = trials, 0
        self.total = sum(t.status == "PENDING" for t in trials.values())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _say(f"start   {self.trials[trial.config['key']].label}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        t = self.trials[trial.config["key"]].trial
        if "epoch" in result and not result.get("finished"):
            _say(f"  {t.backbone} {t.head.name} epoch {int(result['epoch']) + 1}/{t.epochs}: loss "
                 f"{result['train_loss']:.4f} top1 {result['val_top1']:.2f} {result['epoch_seconds']:.1f}s")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _say(f"retry   {self.trials[trial.config['key']].label}: {_error_text(trial.get_pickled_error())}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, _error_text(trial.get_pickled_error()))

    def _end(self, trial: Any, error: str | None) -> None:
        """The outcome `TrialQueue.on_trial_complete` recorded (Tune tells its searcher before its callbacks)."""
        st = self.trials[trial.config["key"]]
        self.ended += 1
        done = st.status == "FINISHED"
        outcome = f"top1 {st.top1:.2f}" if done else error or st.reason or "ended without a result"
        seconds = trial.last_result.get("time_total_s")
        took = "" if seconds is None else f" in {seconds:.0f}s"
        _say(f"{'done' if done else 'FAILED':<7} [{self.ended}/{self.total}] {st.label}: {outcome}{took}")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _error_text(error: BaseException | None) -> str:
    """`Type: message` of the error a trial raised (Ray wraps it in its own task error)."""
    if error is None:
        return "the trial process failed"
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:500]


def _resources(cpus: float, gpus: float, workers: int) -> Any:
    """Per-trial resources: one bundle of `cpus` and `gpus`, or one such bundle per Ray Train worker when a
    trial is data-parallel (`workers` > 1)."""
    if workers == 1:
        return {"cpu": cpus, "gpu": gpus}
    worker = {"CPU": cpus, "GPU": gpus}
    return tune.PlacementGroupFactory([{"CPU": 0.5}] + [worker] * workers)


def _trial_name(trial: Any) -> str:
    """`resnet18-noah(N4_r0.5)-00001`: readable in Ray's folders."""
    cfg = trial.config["trial"]
    name = f"{cfg['backbone']}-{resolve_trial(cfg, {}).head.name}-{trial.trial_id[-5:]}"
    return name.replace(",", "_").replace("=", "")


def tune_study(params: Params, trials: dict[str, StudyTrial], parents: dict[str, str], measured: Measured) -> None:
    """Train the PENDING `trials` in one Ray Tune run, longest chain first (costs from `measured` speeds
    where known); each ends FINISHED, FAILED or BLOCKED with its reason (failures stay in MLflow, not raised).

    `ray.reuse_actors` picks whether a trial process trains the next trial: a new process costs ~10 s of
    imports and start-up (a third of a smoke trial; 149 s against 102 s for Table 6's six trials), while a reused
    one keeps the memory of the trials before it (two reached 9 GB each over a dozen of Tables 1–3's large
    backbones and Ray's OOM killer ended the study)."""
    todo = {k: t for k, t in trials.items() if t.status == "PENDING"}
    jobs = [Job(k, trial_hours(t.trial, measured, params.datasets, params.active.gpu_tflops) or 0.0, t.after)
            for k, t in todo.items()]
    quiet = params.ray.verbose == 0
    # the store and checkpoint root as the driver resolves them (`SHARED_ROOT`), whatever a worker's environment
    root = str(checkpoint_root(params.train.checkpoint_root))
    train = to_dict(dataclasses.replace(params.train, checkpoint_root=root,
                                        progress="off" if quiet else params.train.progress))
    tracking = to_dict(dataclasses.replace(params.mlflow, tracking_uri=resolve_uri(params.mlflow.tracking_uri)))
    space = {k: {"experiment": t.tables[0], "parent_run_id": parents[t.tables[0]],
                 "tags": trial_tags(t, params.profile)} for k, t in todo.items()}
    where = connect(params.ray.address, params.ray.num_cpus, quiet=quiet)
    _say(f"study: {len(todo)} trial(s) to train on Ray ({where}), at most {params.ray.max_concurrent} at a time, "
         "longest first")
    storage = Path(params.ray.storage_path)
    tuner = tune.Tuner(
        tune.with_resources(_trainable, _resources(params.ray.cpus_per_trial, params.ray.gpus_per_trial,
                                                      params.train.num_workers)),
        param_space={"train": train, "mlflow": tracking},
        tune_config=tune.TuneConfig(search_alg=TrialQueue(trials, by_priority(jobs), space), num_samples=-1,
                                    max_concurrent_trials=params.ray.max_concurrent,
                                    reuse_actors=params.ray.reuse_actors,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(
            name=f"study-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}",
            storage_path=str(storage if storage.is_absolute() else REPO_ROOT / storage),
            failure_config=tune.FailureConfig(max_failures=params.ray.max_failures), verbose=params.ray.verbose,
            callbacks=[TrialLines(trials)] if quiet else None))
    try:
        with _signals_stop_tune() as stopped, _environ({NEW_OUTPUT: "0"} if quiet else {}):
            grid = tuner.fit()
    finally:
        ray.shutdown()
    if stopped:
        raise Interrupted(stopped[0])
    for result in grid:
        if result.error is not None and not trials[result.config["key"]].reason:
            trials[result.config["key"]].reason = _error_text(result.error)


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Environment variables set while the block runs (Ray Tune reads its switches when `fit` starts)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _signals_stop_tune() -> Iterator[list[int]]:
    """SIGINT and SIGTERM stop the Tune run (Tune ends its trials and returns, in seconds) and are raised as
    `Interrupted` once Tune has returned; more of them while it stops change nothing (an exception raised
    inside Ray's calls is not one Ray can pass on: it becomes a SystemError). Tune's own Ctrl-C handler is off
    (`TUNE_SIGINT`): it returns from `fit` as if the study had ended, so a stopped study would write partial
    results and exit 0. `ray.init` replaced this process's SIGTERM handler with one that exits from inside
    Ray's own calls (or aborts)."""
    stopped: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        if not stopped:
            signal.raise_signal(signal.SIGUSR1)  # Tune's own stop, which it always listens for: end trials, return
        stopped.append(signum)

    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with _environ({TUNE_SIGINT: "1"}):
            yield stopped
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_study(params: Params, tables: list[str], out_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Validate, reuse finished trials, train the rest as one schedule, write `<table>.json|csv` for each of
    `tables` into `out_dir` (default: the table's own folder, `config.results_dir`); returns those results by
    table."""
    tables = sorted(dict.fromkeys(tables), key=table_order)
    rows = {t: table_rows(params, t) for t in tables}
    uri = resolve_uri(params.mlflow.tracking_uri)
    out_dirs = {t: out_dir or results_dir(params, t) for t in tables}
    check_ready(params, tables, sorted(set(out_dirs.values())), uri)
    measured = read_measured(uri)
    trials = study_trials(rows, measured.finished)
    todo = [t for t in trials.values() if t.status == "PENDING"]
    _say(f"study: {', '.join(tables)}: {sum(len(r) for r in rows.values())} rows, {len(trials)} unique trials, "
         f"{len(trials) - len(todo)} already finished, {len(todo)} to train")
    mlflow_client = client(uri)
    parents = sweep_parents(mlflow_client, tables, params.profile)
    ended, why = "KILLED", "interrupted"  # unless it ends otherwise
    try:
        if todo:
            end_stale_runs(params, uri, todo)
            tune_study(params, trials, {t: p.run_id for t, p in parents.items()}, measured)
            _free_checkpoints(checkpoint_root(params.train.checkpoint_root), uri, needed_sources(params),
                              {t.key for t in todo})
        errors = {k: t.reason for k, t in trials.items() if t.reason}
        tag_trial_runs(mlflow_client, trials, params.profile, uri)
        results = {t: _table_results(params, t, rows[t], uri, errors, out_dirs[t]) for t in tables}
        for table in tables:
            write_row_runs(mlflow_client, parents[table], rows[table], results[table]["rows"], params.profile)
        ended = "FINISHED"
    except Interrupted as err:
        why = f"interrupted: {err}"
        raise
    except Exception as err:
        ended, why = "FAILED", f"the study failed: {type(err).__name__}: {err}"[:500]
        raise
    finally:
        for parent in parents.values():
            close_parent(mlflow_client, parent, ended, None if ended == "FINISHED" else why)
    _summary(trials, results)
    return results


def end_stale_runs(params: Params, uri: str, todo: list[StudyTrial]) -> None:
    """End as KILLED, with the reason, the RUNNING runs of trials about to train that no process is training
    (their folder's lock is free): the process that trained them died without ending them (SIGKILL, a lost
    node). A trial another process trains now (another experiment) keeps its run; an ended run whose id its
    folder keeps is reopened when the trial resumes."""
    root = checkpoint_root(params.train.checkpoint_root)
    for st in todo:
        with trial_lock(root / st.key, st.label, wait=False) as free:
            for run in running_runs(st.key, uri) if free else []:
                TrialRun(uri, run.info.run_id).fail("interrupted: its process ended without ending the run (found "
                                                    "RUNNING with no process training it by the next study)",
                                                    killed=True)
                _say(f"study: ended the stale RUNNING run {run.info.run_id} of {st.label} as KILLED")


def _free_checkpoints(root: Path, uri: str, needed: set[str] | None, ran: set[str]) -> None:
    """Apply `clean`'s rules to the checkpoints under `root` of the trials this study `ran`: a finished trial
    keeps its weights only while a fine-tuning trial of a configured table starts from it (`needed`, as
    `needed_sources` gives it; checkpoints of other studies sharing the root are left to
    `python -m pipeline clean`)."""
    removals = plan_clean(root, uri, needed, only=ran)
    apply_clean(removals)
    if removals:
        _say(f"study: freed {sum(r.bytes for r in removals) / 1e6:.0f} MB of checkpoints no resume or fine-tuning "
             f"needs ({len(removals)} files under {root})")


def _table_results(params: Params, table: str, rows: list[RowTrials], uri: str, errors: dict[str, str],
                   out_dir: Path) -> dict[str, Any]:
    """Write and return `<out_dir>/<table>.json|csv`: meta and each row's outcome read back from MLflow."""
    prof, seed = params.active, params.trial_seeds[0]
    first = rows[0].trials.get(("classify", seed)) or rows[0].trials["scratch", seed]  # the data every row scores on
    meta = {"table": table, "profile": params.profile,
            "dataset": prof.reid_dataset if params.tables[table].task == "reid" else prof.dataset,
            "num_classes": num_classes(first.data_dir), "img_size": first.img_size, "width": first.width,
            "epochs": prof.epochs,
            "batch_size": prof.batch_size, "recipe": params.tables[table].recipe, "seeds": list(params.trial_seeds),
            "chance": chance_levels(first.data_dir),
            "departures": departures(params, first, params.tables[table].task == "reid"),
            "commit": git_commit(), "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    keys = [{kind: trial_key(t) for kind, t in rt.trials.items()} for rt in rows]
    results = {"meta": meta, "rows": [row_result(rt, ks, uri, errors) for rt, ks in zip(rows, keys)]}
    write_results(out_dir, table, results)
    return results


def _summary(trials: dict[str, StudyTrial], results: dict[str, dict[str, Any]]) -> None:
    """The end of the console: every trial this run handed to Ray with its outcome, then every row trial
    without a result, with its reason."""
    ran = [t for t in trials.values() if t.ran or t.status == "BLOCKED"]
    width = max((len(t.trial.label) for t in ran), default=0) + 2
    lines = [f"{'trial':<{width}}{'status':<10}{'top1':>7}{'time':>7}  tables"] if ran else []
    for t in ran:
        top1 = "" if t.top1 is None else f"{t.top1:.2f}"
        secs = "" if t.seconds is None else f"{t.seconds:.0f}s"
        lines.append(f"{t.trial.label:<{width}}{t.status:<10}{top1:>7}{secs:>7}  {', '.join(t.tables)}")
    missing = [f"{table} {line}" for table, res in results.items() for line in unfinished(res["rows"])]
    if missing:
        lines += [f"{len(missing)} row trial(s) without a result (shown as — in the reports; `dvc repro -f -s study`, "
                  "or the stage again, retries them):", *(f"  {m}" for m in missing)]
    _say("\n".join(["study summary:", *lines] if lines else ["study: nothing trained in this run"]))


def check_ready(params: Params, tables: list[str], out_dirs: list[Path], uri: str) -> None:
    """Fail in seconds, before Ray starts, on what would fail every trial or lose its result: unprepared
    data or shards cut short, a results, checkpoint or Ray folder that cannot be written, an MLflow store that
    cannot be used."""
    prof = params.active
    reid = any(params.tables[t].task == "reid" for t in tables)
    for name in (prof.dataset, prof.reid_dataset if reid else None):
        if name is not None:
            try:
                require_prepared(data_dir(params.datasets[name].out))
                check_shards(data_dir(params.datasets[name].out))
            except ConfigError as err:
                raise ConfigError(f"datasets.{name}.out", err.value, err.allowed) from None
    for key, folder in (*(("results", out) for out in out_dirs),
                        ("train.checkpoint_root", checkpoint_root(params.train.checkpoint_root)),
                        ("ray.storage_path", REPO_ROOT / params.ray.storage_path)):
        require_writable(folder, key)
    check_store(uri, "mlflow.tracking_uri")


def study_stage(params: Params, tables: list[str]) -> None:
    """The DVC stage `study`: `tables` are the keys of `tables:` to run; none named, those of `study.tables` (the
    tables `dvc repro` trains)."""
    if not tables and not params.study.tables:
        raise ConfigError("study.tables", [], "one or more keys of `tables` (or tables named on the command line): "
                          + ", ".join(params.tables))
    tables = tables or list(params.study.tables)
    run_study(params.for_tables(tables), tables)
