"""MLflow tracking of trials: one run per trial, resumable, in an experiment per table.

Everything goes through `MlflowClient` with an explicit run id (no global "active run"), so trials
running side by side in one process, in Ray workers or after a restart all write to the right run.
A run's id is kept in its trial's checkpoint folder; a restarted trial reopens the same run and logs
only the epochs the run does not hold yet, so each epoch appears once.
"""
from __future__ import annotations

import fcntl
import functools
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag, ViewType
from mlflow.exceptions import MlflowException

from .. import REPO_ROOT, SHARED_ROOT
from ..config import ConfigError, check_name
from ..utils.io import atomic_write_text, csv_text, require_writable
from ..utils.machine import machine_kind
from .record import RUN_ID_FILE, read_run_id

SQLITE = "sqlite:///"
TRIAL_TAG = "trial_id"
REASON_TAG = "failure_reason"
SUCCESSOR_TAG = "superseded_by"
"""On a trial run replaced by a new run in its checkpoint folder: the new run's id (`end_superseded`)."""
TABLES_TAG, ROWS_TAG, PROFILE_TAG, SEED_TAG = "tables", "rows", "profile", "seed"
"""What a study tags each trial run with: the tables and rows (`table:row`) that need it, its profile and seed."""
DVC_EXP_TAG = "dvc_experiment"
"""The DVC experiment a study ran in (`dvc_experiment()`), on the runs it created; absent outside one."""
TAG_SEPARATOR = ", "
MACHINE_TAGS = "machine."
"""The prefix of what a run trained on: `machine.<fact>` (`utils.machine.machine_facts`), `machine.kind` (their
label) and, for a run resumed on another kind of machine, `machine.kinds` (every kind, joined by `KINDS_SEPARATOR`)."""
KIND_TAG, KINDS_TAG = MACHINE_TAGS + "kind", MACHINE_TAGS + "kinds"
KINDS_SEPARATOR = " | "
MAX_BATCH = 100  # MLflow's limit on params per log_batch call
_MAX_TAG = 5000
SERVER_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "6", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
"""How long a call to a tracking server waits out an outage: MLflow's own retries of refused connections (and
5xx answers) with exponential backoff, 0 + 4 + 8 + 16 + 32 + 64 s, about two minutes before the call fails.
Set in the environment of every process that opens a server's client, unless the user set them already."""
RETRY_WINDOW = 130.0
"""Seconds SERVER_RETRIES wait at most: one outage's retries, said in one line."""
HEALTH_TIMEOUT = 5.0
STORE_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql")
"""The tracking URI schemes MLflow keeps runs in (a plain path is a file store too)."""
STORE_RULE = ("a usable MLflow store: sqlite:///FILE (in a folder this process can write to), http(s)://HOST:PORT "
              "of a tracking server that answers, or a file, postgresql, mysql or mssql URI")
LOCK_WAIT = 120.0
"""Seconds a call waits out a SQLite store that another process holds locked (MLflow's own wait is 20 s a try)."""
SQLITE_MAGIC = b"SQLite format 3\0"
LOCKED = "database is locked"
"""SQLite's error when another process holds the store locked past MLflow's own wait."""
T = TypeVar("T")


def resolve_uri(uri: str) -> str:
    """An absolute tracking URI: a relative SQLite or local path is taken from SHARED_ROOT (the repository
    root, also in DVC's experiment workspaces), so trials whose working folder Ray changed and every
    experiment of the repository write to the same store."""
    if uri.startswith(SQLITE) and not uri.startswith(SQLITE + "/"):
        return SQLITE + str((SHARED_ROOT / uri.removeprefix(SQLITE)).resolve())
    if "://" not in uri:
        return str((SHARED_ROOT / uri).resolve())
    return uri


def local_store(uri: str) -> Path | None:
    """The file or folder of a local store (SQLite file or file store), None for a server; readers that
    must not create a store check that it exists first."""
    uri = resolve_uri(uri)
    db = _sqlite_file(uri)
    if db is not None:
        return db
    return Path(uri) if "://" not in uri else None


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite tracking URI, None for any other store."""
    return Path(uri.removeprefix(SQLITE)) if uri.startswith(SQLITE) else None


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store go beside the database file (`mlartifacts/`), not the working folder."""
    db = _sqlite_file(uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None


def is_server(uri: str) -> bool:
    """Whether the store is an MLflow tracking server (`http://` or `https://`)."""
    return uri.startswith(("http://", "https://"))


def check_server(uri: str) -> None:
    """Raise ConnectionError, in seconds, when the tracking server does not answer its `/health` (MLflow's
    own retries would take minutes to say so); any other store passes."""
    if not is_server(uri):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT) as answer:
            answer.read()
    except OSError as err:  # refused, timed out, or an HTTP error (urllib.error.URLError and HTTPError too)
        reason = getattr(err, "reason", err)
        raise ConnectionError(f"the MLflow tracking server does not answer ({reason})") from None


def check_store(uri: str, key: str) -> None:
    """The pre-flight of every command that writes to MLflow: ConfigError naming `key`, in seconds and before
    anything is created, for an unsupported scheme, a SQLite or file store whose folder cannot be written, a file
    that is not a SQLite database, a server that does not answer, or a store that stays locked past LOCK_WAIT."""
    uri = resolve_uri(uri)
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    if scheme.split("+", 1)[0] not in STORE_SCHEMES:
        raise ConfigError(key, uri, STORE_RULE)
    store = local_store(uri)
    try:
        if store is not None:
            require_writable(store.parent, key)
        db = _sqlite_file(uri)
        if db is not None and db.exists() and (not db.is_file() or not _is_sqlite(db)):
            raise ConfigError(key, str(db), "a SQLite database (this file is not one)")
        check_server(uri)
        if store is None or store.exists():  # a new local store is created by the first run, not here
            client(uri).search_experiments(max_results=1)
    except ConfigError as err:
        raise ConfigError(key, uri, f"{STORE_RULE} ({err.value}: {err.allowed})") from None
    except Exception as err:  # noqa: BLE001 - whatever it is, it would fail the command once it had started
        raise ConfigError(key, uri, f"{STORE_RULE} ({type(err).__name__}: {first_line(err)})") from None


def _is_sqlite(db: Path) -> bool:
    """Whether the file is a SQLite database, or empty (SQLite makes an empty file one)."""
    with open(db, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    return head in (b"", SQLITE_MAGIC)


def first_line(err: BaseException) -> str:
    """An exception's text up to its first line break (SQLAlchemy's run on with the SQL and a link)."""
    return (str(err).strip().splitlines() or [""])[0]


def waited(call: Callable[[], T], uri: str) -> T:
    """`call()`, retried while the SQLite store at `uri` is locked by another process, up to LOCK_WAIT seconds
    (said in one line); then ConfigError. A server's outages are waited out by MLflow's own retries
    (SERVER_RETRIES)."""
    deadline = None
    while True:
        try:
            return call()
        except Exception as err:
            if LOCKED not in str(err):  # another process holds the SQLite store locked
                raise
            if deadline is None:
                deadline = time.monotonic() + LOCK_WAIT
                print(f"the MLflow store {uri} is locked by another process: waiting up to {LOCK_WAIT:.0f} s",
                      file=sys.stderr, flush=True)
            elif time.monotonic() >= deadline:
                raise ConfigError("mlflow.tracking_uri", uri, f"a store no other process holds locked for over "
                                  f"{LOCK_WAIT:.0f} s (it is still locked)") from None
            time.sleep(1.0)


class _NoDbTraceback(logging.Filter):
    """MLflow logs each failed call on a SQLite store with its whole traceback (60 lines), then raises it: the
    caller says it in one line (`waited` for a lock, the command for the rest)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


_NO_DB_TRACEBACK = _NoDbTraceback()


class _WaitingClient:
    """An MlflowClient whose every call goes through `waited` (a store locked for a while never kills a trial)."""

    def __init__(self, inner: MlflowClient):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name.startswith("_") or not callable(attr):
            return attr
        return lambda *args, **kwargs: waited(lambda: attr(*args, **kwargs), self._inner.tracking_uri)


class _OneRetryLine(logging.Filter):
    """urllib3 logs each retry of a refused connection to a logger nobody shows (its NullHandler): print one
    readable line per outage instead (per process), again only once a whole retry window has passed."""

    def __init__(self) -> None:
        super().__init__()
        self.said_at = -RETRY_WINDOW

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Retrying"):
            return True
        if time.monotonic() - self.said_at >= RETRY_WINDOW:
            self.said_at = time.monotonic()
            print("the MLflow tracking server does not answer: retrying with backoff for up to about two minutes "
                  "(MLFLOW_HTTP_REQUEST_MAX_RETRIES)", file=sys.stderr, flush=True)
        return False


_RETRY_LINE = _OneRetryLine()


def _server_client(uri: str) -> MlflowClient:
    """The client of a tracking server, its calls retried through an outage (`SERVER_RETRIES`)."""
    for key, value in SERVER_RETRIES.items():
        os.environ.setdefault(key, value)
    pool_log = logging.getLogger("urllib3.connectionpool")
    if _RETRY_LINE not in pool_log.filters:
        pool_log.addFilter(_RETRY_LINE)
    return MlflowClient(tracking_uri=uri)


@functools.cache
def client(uri: str) -> MlflowClient:
    """The client of a tracking store (one per URI and process), its calls waiting out a locked store
    (`waited`). A SQLite store is opened under an exclusive lock on `<db>.lock`: processes opening a new store
    at once (trials starting together) would otherwise race to create its tables and fail; a server does that
    itself. Artifact downloads show no progress bar of MLflow's own (the console stays one line per step)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = resolve_uri(uri)
    if is_server(uri):
        return _server_client(uri)
    db = _sqlite_file(uri)
    if db is None:
        return cast(MlflowClient, _WaitingClient(MlflowClient(tracking_uri=uri)))
    db_log = logging.getLogger("mlflow.store.db.utils")
    if _NO_DB_TRACEBACK not in db_log.filters:
        db_log.addFilter(_NO_DB_TRACEBACK)
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        opened = waited(lambda: MlflowClient(tracking_uri=uri), uri)  # creates or upgrades the tables
    return cast(MlflowClient, _WaitingClient(opened))


def experiment_id(mlflow_client: MlflowClient, name: str) -> str:
    """The id of experiment `name`, creating it if needed (tolerating another process creating it first).
    A deleted one is restored: MLflow keeps its name taken and takes no runs into it while it is deleted.
    The name becomes its artifact folder, so it is checked like every such name (`check_name`)."""
    check_name("experiment", name)
    for _ in range(2):
        found = mlflow_client.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(found.experiment_id)
            print(f"restored the deleted MLflow experiment {name!r} (id {found.experiment_id}) to log into it",
                  file=sys.stderr)
        if found is not None:
            return found.experiment_id
        try:
            root = _artifact_root(mlflow_client.tracking_uri)
            return mlflow_client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)
        except MlflowException:
            continue
    raise RuntimeError(f"could not create or find MLflow experiment {name!r}")


DVC_OUTPUTS = ("dvc.lock", "results", "reports")
"""What `dvc repro` rewrites in the worktree while it runs: changes there are not code changes."""


def git_commit(repo: Path = REPO_ROOT) -> str:
    """The repository's commit, with `-dirty` when tracked files other than DVC_OUTPUTS differ from it
    (so a clean checkout's `dvc repro`, which rewrites dvc.lock mid-run, stamps the plain commit), or
    `unknown` outside git."""
    excluded = [f":(top,exclude){path}" for path in DVC_OUTPUTS]
    try:
        run = functools.partial(subprocess.run, cwd=repo, capture_output=True, text=True, timeout=10)
        head = run(["git", "rev-parse", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", *excluded]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("-dirty" if dirty else "")) if head else "unknown"


def dvc_experiment() -> str | None:
    """The name of the DVC experiment this process runs in (`dvc exp run` sets DVC_EXP_NAME for its stages),
    None under `dvc repro` or outside DVC."""
    return os.environ.get("DVC_EXP_NAME") or None


def _runs(trial_id: str, tracking_uri: str, where: str, order: str, max_results: int) -> list[Run]:
    """Runs of a trial identity, in any active experiment, matching `where` in `order`."""
    mlflow_client = client(tracking_uri)
    ids = [e.experiment_id for e in mlflow_client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not ids:
        return []
    return mlflow_client.search_runs(ids, filter_string=f"tags.{TRIAL_TAG} = '{trial_id}'{where}",
                                     order_by=[order], max_results=max_results)


def _newest_run(trial_id: str, tracking_uri: str, where: str, order: str) -> Run | None:
    """The first run of a trial identity, in any active experiment, matching `where` in `order`."""
    runs = _runs(trial_id, tracking_uri, where, order, 1)
    return runs[0] if runs else None


def find_finished(trial_id: str, tracking_uri: str) -> Run | None:
    """The newest FINISHED run of a trial identity in any experiment (what a study reuses), or None."""
    return _newest_run(trial_id, tracking_uri, " and attributes.status = 'FINISHED'", "attributes.end_time DESC")


def find_running(trial_id: str, tracking_uri: str) -> Run | None:
    """The newest RUNNING run of a trial identity (one training now, or `--retrain` over a FINISHED run), or
    None: its checkpoint is what it resumes from."""
    return _newest_run(trial_id, tracking_uri, " and attributes.status = 'RUNNING'", "attributes.start_time DESC")


def running_runs(trial_id: str, tracking_uri: str) -> list[Run]:
    """Every RUNNING run of a trial identity, newest first."""
    return _runs(trial_id, tracking_uri, " and attributes.status = 'RUNNING'", "attributes.start_time DESC", 1000)


def latest_run(trial_id: str, tracking_uri: str) -> Run | None:
    """The FINISHED run of a trial identity if there is one, else its newest run of any status (what a
    results row reports, failures with their reason included)."""
    return find_finished(trial_id, tracking_uri) or _newest_run(trial_id, tracking_uri, "",
                                                                "attributes.start_time DESC")


def result_of(run: Run) -> dict[str, Any]:
    """The summary a trial returns, read back from its MLflow run."""
    metrics = run.data.metrics
    out: dict[str, Any] = {k: v for k, v in metrics.items() if k in FINAL_METRICS}
    for key in ("params", "madds"):
        if key in out:
            out[key] = int(out[key])
    out.update(run_id=run.info.run_id, trial_id=run.data.tags.get(TRIAL_TAG), status=run.info.status,
               reason=run.data.tags.get(REASON_TAG), machine=run.data.tags.get(KIND_TAG))
    return out


FINAL_METRICS = ("top1", "top5", "map", "top1_ema", "top5_ema", "best_top1", "params", "madds", "train_seconds",
                 "images_per_s")
EPOCH_METRICS = ("train_loss", "lr", "train_top1", "val_top1", "val_top5", "images_per_s_epoch", "epoch_seconds",
                 "data_wait_fraction", "loader_images_per_s")
EMA_EPOCH_METRICS = ("val_top1_ema", "val_top5_ema")  # only for recipes with an EMA of the weights
REID_EPOCH_METRICS = ("val_map",)  # only for re-identification trials
LOGGED_EPOCH_METRICS = EPOCH_METRICS + EMA_EPOCH_METRICS + REID_EPOCH_METRICS


class TrialRun:
    """The MLflow run of one trial, addressed by id; safe to reopen after a crash."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = resolve_uri(tracking_uri), run_id
        self.client = client(self.tracking_uri)

    @classmethod
    def open(cls, tracking_uri: str, experiment: str, checkpoint_dir: Path, run_name: str,
             tags: Mapping[str, str], parent_run_id: str | None = None) -> TrialRun:
        """Reopen the run whose id the checkpoint folder holds if it is this trial's (its `trial_id` tag is
        the one in `tags`), or start one and record its id there."""
        mlflow_client = client(tracking_uri)
        run_id = read_run_id(checkpoint_dir)
        held = _existing_run(mlflow_client, run_id) if run_id else None
        if held is not None and held.data.tags.get(TRIAL_TAG) == tags.get(TRIAL_TAG):
            mlflow_client.update_run(held.info.run_id, status="RUNNING")
            if REASON_TAG in held.data.tags:
                mlflow_client.delete_tag(held.info.run_id, REASON_TAG)
            return cls(tracking_uri, held.info.run_id)
        all_tags = dict(tags)
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = mlflow_client.create_run(experiment_id(mlflow_client, experiment), tags=all_tags, run_name=run_name)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(checkpoint_dir / RUN_ID_FILE, run.info.run_id)
        return cls(tracking_uri, run.info.run_id)

    def run(self) -> Run:
        return self.client.get_run(self.run_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params the run does not hold yet (MLflow params are write-once)."""
        held = self.run().data.params
        todo = [Param(k, str(v)) for k, v in params.items() if k not in held]
        for i in range(0, len(todo), MAX_BATCH):
            self.client.log_batch(self.run_id, params=todo[i:i + MAX_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)[:_MAX_TAG]) for k, v in tags.items()])

    def set_machine(self, facts: Mapping[str, str]) -> None:
        """Record what this attempt trains on: `machine.<fact>` and `machine.kind` overwrite an earlier
        attempt's; once the kind differs from an earlier attempt's, `machine.kinds` lists every kind the run
        trained on, in order (a run that mixed machines need not repeat bit for bit)."""
        kind = machine_kind(facts)
        held = self.run().data.tags
        kinds = (held.get(KINDS_TAG) or held.get(KIND_TAG) or kind).split(KINDS_SEPARATOR)
        tags = {MACHINE_TAGS + fact: value for fact, value in facts.items()} | {KIND_TAG: kind}
        if kind not in kinds:
            kinds.append(kind)
        if len(kinds) > 1:
            tags[KINDS_TAG] = KINDS_SEPARATOR.join(kinds)
        self.set_tags(tags)

    def logged_epochs(self, key: str = "val_top1") -> set[int]:
        """The epochs (steps) for which the run already holds the per-epoch metric `key`."""
        return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_epochs(self, history: Iterable[Mapping[str, float]]) -> None:
        """Log the per-epoch metrics of every epoch in `history` that the run does not hold yet."""
        held = self.logged_epochs()
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(row[k]), now, int(row["epoch"])) for row in history if int(row["epoch"]) not in held
                   for k in LOGGED_EPOCH_METRICS if k in row]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_final(self, metrics: Mapping[str, float]) -> None:
        """Log the summary metrics once (a re-entered finished trial does not log them twice)."""
        held = self.run().data.metrics
        now = int(time.time() * 1000)
        todo = [Metric(k, float(v), now, 0) for k, v in metrics.items() if k not in held]
        if todo:
            self.client.log_batch(self.run_id, metrics=todo)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))

    def fail(self, reason: str, killed: bool = False) -> None:
        """End the run FAILED (KILLED: interrupted, e.g. by SIGTERM) with the reason as a tag."""
        self.set_tags({REASON_TAG: reason})
        self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.KILLED if killed else RunStatus.FAILED))


def end_superseded(tracking_uri: str, run_id: str, successor: str, why: str) -> None:
    """Tag run `run_id` with the run that replaces it in its checkpoint folder (`SUCCESSOR_TAG`), and end it
    KILLED with `why` if it was left RUNNING: the process that trained it died without ending it (the folder's
    lock is held by the caller). A run the store no longer holds is left alone."""
    mlflow_client = client(tracking_uri)
    run = _existing_run(mlflow_client, run_id)
    if run is None:
        return
    mlflow_client.set_tag(run_id, SUCCESSOR_TAG, successor)
    if run.info.status == "RUNNING":
        TrialRun(tracking_uri, run_id).fail(f"superseded by run {successor}: {why}", killed=True)


def _existing_run(mlflow_client: MlflowClient, run_id: str) -> Run | None:
    """The run with this id if the store holds it (a checkpoint folder may outlive a deleted store)."""
    try:
        run = mlflow_client.get_run(run_id) if run_id else None
    except MlflowException:
        return None
    return run if run is not None and run.info.lifecycle_stage == "active" else None


def metrics_csv(history: list[Mapping[str, float]]) -> str:
    """The per-epoch metrics as CSV text (one row per epoch)."""
    return csv_text(history, ["epoch", *[k for k in LOGGED_EPOCH_METRICS if any(k in row for row in history)]])


def plot_learning_curves(path: Path, history: list[Mapping[str, float]], title: str) -> None:
    """Train loss, validation top-1/top-5 and lr per epoch, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(row["epoch"]) + 1 for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(epochs, [row["train_loss"] for row in history], marker="o")
    axes[0].set(title="train loss", xlabel="epoch")
    for key in ("val_top1", "val_top5"):
        axes[1].plot(epochs, [row[key] for row in history], marker="o", label=key)
    axes[1].set(title="validation accuracy (%)", xlabel="epoch")
    axes[1].legend()
    axes[2].plot(epochs, [row["lr"] for row in history], marker="o")
    axes[2].set(title="learning rate (epoch start)", xlabel="epoch")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
