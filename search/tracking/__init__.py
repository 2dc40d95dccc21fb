"""MLflow tracking of a search: one parent run per search, one nested child run per trial attempt.

All MLflow writes come from the search driver, in Ray Tune's event loop (a `tune.Callback`), so
concurrent trials never write to the store at the same time: a local sqlite store is safe, and a
tracking server (`--tracking-uri http://HOST:PORT`) sees one client. Trials on remote nodes need
no route to MLflow: their artifacts travel in the Ray checkpoint of their final result.

Schema (docs/design.md): parent tags htnet.role=search, htnet.search, htnet.objective,
htnet.objective_protocol. Child tags mlflow.parentRunId, htnet.role=trial, htnet.search,
htnet.trial_id (the Ray trial id), htnet.attempt, htnet.status (running|finished|pruned|failed,
interrupted while a stopped search waits for `resume`), htnet.device, htnet.node_id,
htnet.resources, htnet.optuna_trial, htnet.objective_protocol; params = the flattened
resolved LOSO config; metrics = the flat engine keys (`{protocol}_{dataset}_{uf1|uar}`,
`inner_val_uf1`, `fold_epochs`, `wall_time_s`), `folds_done`, `trial_wall_time_s`, and the
intermediate curve `curve_<key>` by step (step = LOSO folds done); artifacts: config.yaml (every
trial), predictions.csv, history.csv, metrics.json, confusion_matrix.png, learning_curve.png and
weights/ (finished trials; weights when asked).

Run status: finished -> FINISHED, pruned -> FINISHED with htnet.status=pruned (the Optuna pruner
stopped it), failed -> FAILED. A trial whose worker died and that Ray retries keeps its failed
attempt as a FAILED run tagged htnet.retried=true; the retry is a new run (htnet.attempt + 1).
A resumed search reuses the RUNNING run of a trial Ray restarts (tagged htnet.restarts), replays
trials that ended after Ray's last snapshot instead of running them again, and marks runs of
trials Ray lost with the driver (never in a snapshot) as failed with htnet.lost=true.

MLflow unreachable: a search does not start (`check_reachable`). If it goes away mid-search, the
callback prints one line and stops writing; trials go on, Ray keeps their results and files; the
search ends unfinished (exit 1) unless MLflow is back by then. `search resume` then logs every
ended trial MLflow missed (`backfill`, tagged htnet.backfilled=true), into the trial's open run
where it has one, so no trial gets two runs.
"""
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

from ray import tune

from search.space import flatten

logger = logging.getLogger(__name__)

# MLflow's HTTP client retries a dead server for minutes by default (7 retries, backoff factor 2,
# 120 s timeout per request). The driver fails over to Ray's records instead (see MlflowTracking),
# so it asks for a few quick retries; `retry` below adds its own backoff. Environment wins.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
FINAL_ERROR_CODES = ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                     "BAD_REQUEST")

TERMINAL = ("finished", "pruned", "failed")
CURVE_SKIP = {"step", "folds_total", "final", "training_iteration", "time_this_iter_s", "time_total_s",
              "timestamp", "iterations_since_restore", "time_since_restore", "htnet_pid", "done"}
RESULT_KEYS = ("_uf1", "_uar")


_checked_stores = set()  # sqlite stores this process has opened (MLflow caches the store per URI)


def client_for(tracking_uri):
    from mlflow import MlflowClient

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if str(tracking_uri).startswith("sqlite:///") and tracking_uri not in _checked_stores:
        open_sqlite_store(tracking_uri)
        _checked_stores.add(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


def open_sqlite_store(tracking_uri):
    """Open a local sqlite store once, one process at a time: a new file gets MLflow's schema
    migrations (two processes migrating one file at once crash in alembic), and a file that is
    not an MLflow database is one line naming it, not a traceback."""
    from mlflow import MlflowClient

    from htnet.errors import UserError
    from htnet.io import file_lock

    path = Path(tracking_uri[len("sqlite:///"):])
    try:
        with file_lock(path.parent / f".{path.name}.lock"):
            MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)  # builds the store
    except OSError as e:
        raise UserError(f"MLflow store {path}: cannot open it ({e.strerror})") from None
    except mlflow_errors() as e:
        reason = str(getattr(e, "orig", None) or short_reason(e)).strip().splitlines()[0][:200]
        raise UserError(f"MLflow store {path}: not a usable MLflow database ({reason}); move it away "
                        f"or pass another --tracking-uri") from None


def mlflow_errors():
    """What a failing MLflow store raises: MlflowException (the HTTP client wraps connection
    errors and timeouts in it, the sqlite store most database errors), a requests error, or a
    raw SQLAlchemy error (a damaged sqlite file)."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException
    from sqlalchemy.exc import SQLAlchemyError

    return (MlflowException, RequestException, SQLAlchemyError)


def short_reason(error):
    """A few words for why an MLflow call failed (its messages quote whole URLs and retry states)."""
    text = str(error).strip()
    if "Connection refused" in text or "NewConnectionError" in text or "RemoteDisconnected" in text:
        return "connection refused"
    if "timed out" in text or "Timeout" in text:
        return "timed out"
    return text.splitlines()[0][:200] if text else type(error).__name__


def is_http(tracking_uri):
    return str(tracking_uri).startswith(("http://", "https://"))


def unreachable(tracking_uri, timeout=5.0):
    """Why the MLflow store at `tracking_uri` cannot be used now, in a few words; None if it can.
    A server must answer HTTP within `timeout` s (one try); a sqlite file needs a writable folder."""
    if is_http(tracking_uri):
        import requests

        try:
            response = requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=timeout)
        except requests.RequestException as e:
            reason = type(e).__name__
            if isinstance(e, requests.ConnectionError):
                reason = "connection refused"
            return reason
        if response.status_code in (502, 503, 504):
            return f"HTTP {response.status_code}"
        return None
    if str(tracking_uri).startswith("sqlite:///"):
        folder = Path(tracking_uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            return f"folder {folder} does not exist"
        if not os.access(folder, os.W_OK):
            return f"folder {folder} is not writable"
    return None


def unreachable_message(tracking_uri, reason, search_name=None, kept=None):
    """The one line a user sees when MLflow is gone: what failed, what is kept, what to do."""
    what = f"MLflow tracking server at {tracking_uri}" if is_http(tracking_uri) else f"MLflow store {tracking_uri}"
    text = f"{what} unreachable ({reason})"
    if search_name is not None:
        text += (f": results are kept in {kept}; restart it and run `python -m search resume "
                 f"{search_name}` to fill MLflow in")
    return text


def check_reachable(tracking_uri):
    """UserError (one line) unless the MLflow store answers: checked before a search starts."""
    from htnet.errors import UserError

    reason = unreachable(tracking_uri)
    if reason is not None:
        fix = "start it or pass another --tracking-uri" if is_http(tracking_uri) else "pass another --tracking-uri"
        raise UserError(f"{unreachable_message(tracking_uri, reason)}; {fix}")


def retry(fn, *args, tries=6, **kwargs):
    """Call an MLflow client method, retrying transient failures (a busy sqlite file, a server
    restarting). Errors MLflow calls final (bad parameter, already exists) are raised at once."""
    from mlflow.exceptions import MlflowException

    for attempt in range(tries):
        try:
            return fn(*args, **kwargs)
        except MlflowException as e:
            if e.error_code in FINAL_ERROR_CODES or attempt == tries - 1:
                raise
            delay = min(8.0, 0.25 * 2 ** attempt)
        except OSError:
            if attempt == tries - 1:
                raise
            delay = min(8.0, 0.25 * 2 ** attempt)
        logger.warning("MLflow call %s failed, retrying in %.1f s", getattr(fn, "__name__", fn), delay)
        time.sleep(delay)


def ensure_experiment(client, name, tracking_uri=None):
    """The experiment's id, created if needed. With a local sqlite store the artifacts go to
    mlruns/<experiment>/ beside the database file (MLflow's default is mlruns/ in the working folder)."""
    from mlflow.exceptions import MlflowException

    experiment = retry(client.get_experiment_by_name, name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            retry(client.restore_experiment, experiment.experiment_id)
        return experiment.experiment_id
    location = None
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        folder = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        location = (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlruns" / folder).as_uri()
    try:
        return retry(client.create_experiment, name, artifact_location=location)
    except MlflowException:  # another search created it at the same moment
        return retry(client.get_experiment_by_name, name).experiment_id


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _param_value(value):
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def log_params(client, run_id, params):
    from mlflow.entities import Param

    items = [Param(str(k), _param_value(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):
        retry(client.log_batch, run_id, params=items[start:start + 100])


def log_metrics(client, run_id, metrics, step=0, timestamp=None):
    from mlflow.entities import Metric

    timestamp = timestamp or int(time.time() * 1000)
    items = [Metric(str(k), float(v), timestamp, int(step)) for k, v in metrics.items() if _is_number(v)]
    for start in range(0, len(items), 1000):
        retry(client.log_batch, run_id, metrics=items[start:start + 1000])


def set_tags(client, run_id, tags):
    from mlflow.entities import RunTag

    items = [RunTag(str(k), str(v)) for k, v in tags.items()]
    for start in range(0, len(items), 100):
        retry(client.log_batch, run_id, tags=items[start:start + 100])


def search_runs(client, experiment_id, filter_string):
    """All runs matching a filter (paginated)."""
    runs, token = [], None
    while True:
        page = retry(client.search_runs, [experiment_id], filter_string=filter_string,
                     max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def child_runs(client, experiment_id, parent_run_id):
    return search_runs(client, experiment_id, f"tags.mlflow.parentRunId = '{parent_run_id}'")


def start_parent_run(client, experiment_id, name, space, objective_metric, extra_params=None):
    tags = {"htnet.role": "search", "htnet.search": name, "htnet.objective": objective_metric,
            "htnet.objective_protocol": space.objective, "mlflow.runName": name}
    run = retry(client.create_run, experiment_id, tags=tags, run_name=name)
    run_id = run.info.run_id
    params = {"num_samples": space.num_samples, "max_concurrent_trials": space.max_concurrent_trials,
              "sampler": space.sampler, "pruner": space.pruner, "resources": space.resources,
              "max_failures": space.max_failures, "objective": space.objective,
              "space_file": space.source, **(extra_params or {})}
    log_params(client, run_id, params)
    retry(client.log_dict, run_id, space.raw, "space.yaml")
    return run_id


def finish_parent_run(client, parent_run_id, table, metric, status="FINISHED"):
    """Counts, the best objective and the trial table on the parent run."""
    import tempfile
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    metrics = {f"trials_{k}": v for k, v in counts.items()}
    scored = table[table["status"].isin(["finished"])] if len(table) else table
    if len(scored) and metric in scored and scored[metric].notna().any():
        best = scored.loc[scored[metric].idxmax()]
        metrics[f"best_{metric}"] = best[metric]
        set_tags(client, parent_run_id, {"htnet.best_trial_id": best["trial_id"],
                                         "htnet.best_run_id": best["run_id"]})
    log_metrics(client, parent_run_id, metrics)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trials.csv"
        table.to_csv(path, index=False)
        retry(client.log_artifact, parent_run_id, str(path))
    retry(client.set_terminated, parent_run_id, status)


def trial_table(client, experiment_id, parent_run_id, metric, param_names=()):
    """One row per trial (its latest attempt): status, objective, test UF1/UAR, parameters."""
    import pandas as pd

    rows = []
    for run in child_runs(client, experiment_id, parent_run_id):
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        rows.append({
            "trial_id": tags.get("htnet.trial_id"), "attempt": int(tags.get("htnet.attempt", 1)),
            "status": tags.get("htnet.status", "running"), "run_id": run.info.run_id,
            "run_status": run.info.status, "retried": tags.get("htnet.retried") == "true",
            "lost": tags.get("htnet.lost") == "true", "optuna_trial": tags.get("htnet.optuna_trial"),
            metric: metrics.get(metric, float("nan")),
            **{k: metrics.get(k, float("nan")) for k in ("inner_full_uf1", "inner_full_uar",
                                                         "paper_full_uf1", "paper_full_uar",
                                                         "final_full_uf1", "folds_done")},
            **{name: params.get(name) for name in param_names},
        })
    table = pd.DataFrame(rows)
    if not len(table):
        return table
    table = table[~table["lost"]]
    table = table.sort_values("attempt").groupby("trial_id", sort=False).tail(1)
    order = {"finished": 0, "pruned": 1, "running": 2, "interrupted": 2, "failed": 3}
    return (table.assign(_order=table["status"].map(order).fillna(4))
            .sort_values(["_order", metric], ascending=[True, False]).drop(columns="_order")
            .reset_index(drop=True))


def create_trial_run(client, experiment_id, parent_run_id, search_name, space, trial_id, config,
                     attempt, optuna_number=None, resources=None, run_name=None, extra_tags=None):
    """The child run of one trial attempt: tags, flattened parameters and config.yaml."""
    tags = {"mlflow.parentRunId": parent_run_id, "htnet.role": "trial",
            "htnet.search": search_name, "htnet.trial_id": trial_id,
            "htnet.attempt": attempt, "htnet.status": "running",
            "htnet.objective": space.metric, "htnet.objective_protocol": space.objective,
            "htnet.optuna_study": search_name, **(extra_tags or {})}
    if optuna_number is not None:
        tags["htnet.optuna_trial"] = optuna_number
    tags["htnet.resources"] = ",".join(f"{k.lower()}={v:g}" for k, v in sorted((resources or {}).items())
                                       if k in ("CPU", "GPU"))
    run = retry(client.create_run, experiment_id, tags={k: str(v) for k, v in tags.items()},
                run_name=run_name)
    run_id = run.info.run_id
    log_params(client, run_id, flatten(config))
    retry(client.log_dict, run_id, config, "config.yaml")
    return run_id


def trial_status(result, pruned=False):
    if pruned or result.get("htnet_status") == "pruned":
        return "pruned"
    return "failed" if result.get("htnet_status") == "failed" else "finished"


def log_trial_end(client, run_id, trial_id, result, status, checkpoint=None, wall_time_s=None, tags=None):
    """Final metrics, the files of a finished trial (its Ray checkpoint) and the end status."""
    metrics = {k: v for k, v in result.items()
               if (k.endswith(RESULT_KEYS) or k in ("fold_epochs", "wall_time_s"))
               and not k.startswith("htnet_") and _is_number(v)}
    metrics["folds_done"] = result.get("step", 0)
    if wall_time_s is not None:
        metrics["trial_wall_time_s"] = wall_time_s
    log_metrics(client, run_id, metrics, step=result.get("step", 0))
    if status == "finished" and checkpoint is not None:
        try:
            with checkpoint.as_directory() as folder:
                retry(client.log_artifacts, run_id, folder)
        except mlflow_errors():
            raise
        except Exception as e:  # noqa: BLE001 - a missing artifact must not end the search
            logger.warning("could not log the artifacts of trial %s: %s", trial_id, e)
            set_tags(client, run_id, {"htnet.artifacts_error": str(e).splitlines()[0][:500]})
    tags = dict(tags or {})
    if status == "failed":
        tags.setdefault("htnet.error", str(result.get("htnet_error", ""))[:5000])
    if status == "pruned":
        tags["htnet.pruned_at_step"] = result.get("step", "")
    set_tags(client, run_id, {"htnet.status": status, **tags})
    retry(client.set_terminated, run_id, "FAILED" if status == "failed" else "FINISHED")


class MlflowTracking(tune.Callback):
    """Ray Tune callback: the child run of every trial attempt, logged from the driver.

    If MLflow stops answering (a tracking server that died, a full disk), the callback prints one
    line and stops writing to MLflow; the trials go on and Ray keeps their results (result.json
    and the checkpoint with the trial's files, under the search's Ray folder). `search resume`
    then logs what MLflow missed (`backfill`)."""

    _offline = None      # why MLflow became unreachable; None while it answers
    results_path = None  # where Ray keeps the trials' results (for the message)

    def __init__(self, tracking_uri, experiment_id, search_name, parent_run_id, space, searcher,
                 overrides=None, results_path=None):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.search_name = search_name
        self.parent_run_id = parent_run_id
        self.space = space
        self.searcher = searcher
        self.overrides = overrides or {}
        self.results_path = results_path
        self._client = None
        self._reset_state()

    def _reset_state(self):
        self._runs = {}        # trial id -> run id of the attempt in progress
        self._attempts = {}    # trial id -> attempts so far
        self._terminal = {}    # trial id -> run id of a run that ended (finished|pruned|failed)
        self._started = {}     # trial id -> time.time() of the attempt's start
        self._tagged = set()   # trial ids whose device/node tags are set
        self._loaded = False
        self._orphans_checked = False

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_client"] = None
        state.pop("_offline", None)
        return state

    @property
    def client(self):
        if self._client is None:
            self._client = client_for(self.tracking_uri)
        return self._client

    @property
    def offline(self):
        return self._offline

    def _guard(self, what, fn, *args):
        """Run one MLflow step of a Ray event; a store that fails turns the callback offline."""
        if self._offline:
            return None
        try:
            return fn(*args)
        except mlflow_errors() as e:
            from mlflow.exceptions import MlflowException

            if isinstance(e, MlflowException) and e.error_code in FINAL_ERROR_CODES:
                logger.warning("MLflow refused %s: %s", what, str(e).strip()[:300])  # one call, not the store
                return None
            self._offline = first = short_reason(e)
            kept = self.results_path or "Ray's results folder"
            print(f"error: {unreachable_message(self.tracking_uri, first, self.search_name, kept)} "
                  f"(the trials go on)", file=sys.stderr, flush=True)
            return None

    # -- state from MLflow (resume)

    def setup(self, **info):
        self._guard("setup", self._load_existing)

    def _load_existing(self):
        if self._loaded:
            return
        self._loaded = True
        for run in sorted(child_runs(self.client, self.experiment_id, self.parent_run_id),
                          key=lambda r: int(r.data.tags.get("htnet.attempt", 1))):
            tags = run.data.tags
            trial_id = tags.get("htnet.trial_id")
            if trial_id is None or tags.get("htnet.lost") == "true":
                continue
            self._attempts[trial_id] = max(self._attempts.get(trial_id, 0), int(tags.get("htnet.attempt", 1)))
            status = tags.get("htnet.status", "running")
            if status in ("running", "interrupted"):
                self._runs[trial_id] = run.info.run_id
            elif status in TERMINAL and tags.get("htnet.retried") != "true":
                self._terminal[trial_id] = run.info.run_id
                self._runs.pop(trial_id, None)

    def on_step_begin(self, iteration, trials, **info):
        if self._orphans_checked:
            return
        self._orphans_checked = True
        self._guard("the check for lost trials", self._mark_lost, trials)

    def _mark_lost(self, trials):
        known = {t.trial_id for t in trials}
        for trial_id, run_id in list(self._runs.items()):
            if trial_id not in known:
                set_tags(self.client, run_id, {"htnet.status": "failed", "htnet.lost": "true",
                                               "htnet.error": "the driver died before Ray recorded this "
                                                              "trial; its sample was drawn again"})
                retry(self.client.set_terminated, run_id, "KILLED")
                del self._runs[trial_id]

    # -- trial events

    def _config_of(self, trial):
        return self.space.resolve(self.space.sampled(trial.config), self.overrides)

    def on_trial_start(self, iteration, trials, trial, **info):
        trial_id = trial.trial_id
        self._started[trial_id] = time.time()
        if self._offline:  # Optuna still learns which Ray trial is which (backfill, resume)
            self.searcher.set_ray_trial_attrs(trial_id, ray_trial_id=trial_id)
            return
        self._guard("the start of trial " + trial_id, self._start, trial)

    def _start(self, trial):
        trial_id = trial.trial_id
        if trial_id in self._terminal:
            return  # ended before the driver was killed: the trainable replays its result
        if trial_id in self._runs:  # restarted by a resumed search: the same run goes on
            run_id = self._runs[trial_id]
            run = retry(self.client.get_run, run_id)
            restarts = int(run.data.tags.get("htnet.restarts", 0)) + 1
            if run.info.status != "RUNNING":
                retry(self.client.update_run, run_id, status="RUNNING")
            set_tags(self.client, run_id, {"htnet.restarts": restarts, "htnet.status": "running"})
            return
        attempt = self._attempts.get(trial_id, 0) + 1
        self._attempts[trial_id] = attempt
        name = str(trial) + (f"-attempt{attempt}" if attempt > 1 else "")
        run_id = create_trial_run(
            self.client, self.experiment_id, self.parent_run_id, self.search_name, self.space, trial_id,
            self._config_of(trial), attempt, self.searcher.optuna_trial_number(trial_id),
            getattr(trial.placement_group_factory, "required_resources", {}), name)
        self._runs[trial_id] = run_id
        self.searcher.set_ray_trial_attrs(trial_id, ray_trial_id=trial_id, mlflow_run_id=run_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.searcher.is_pruned(trial.trial_id):
            result["htnet_status"] = "pruned"  # shows in Ray Tune's table and results
        self._guard("a result of trial " + trial.trial_id, self._result, trial, result)

    def _result(self, trial, result):
        trial_id = trial.trial_id
        run_id = self._runs.get(trial_id)
        if run_id is None or result.get("htnet_status") == "replayed":
            return
        if trial_id not in self._tagged and result.get("htnet_device"):
            self._tagged.add(trial_id)
            set_tags(self.client, run_id, {"htnet.device": result["htnet_device"],
                                           "htnet.node_id": result.get("htnet_node", ""),
                                           "htnet.worker_pid": result.get("htnet_pid", "")})
        step = result.get("step")
        if step is None or result.get("htnet_status") == "failed":
            return
        log_metrics(self.client, run_id, curve_of(result), step=step)

    def _end(self, trial_id, status, mlflow_status, tags=None):
        run_id = self._runs.pop(trial_id)
        self._tagged.discard(trial_id)  # a retry is a new run: tag its device and node too
        set_tags(self.client, run_id, {"htnet.status": status, **(tags or {})})
        retry(self.client.set_terminated, run_id, mlflow_status)
        return run_id

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._guard("the end of trial " + trial.trial_id, self._complete, trial)

    def _complete(self, trial):
        trial_id = trial.trial_id
        if trial_id not in self._runs:
            return
        result = trial.last_result or {}
        status = trial_status(result, self.searcher.is_pruned(trial_id))
        run_id = self._runs[trial_id]
        wall = time.time() - self._started[trial_id] if trial_id in self._started else None
        log_trial_end(self.client, run_id, trial_id, result, status,
                      trial.checkpoint if status == "finished" else None, wall)
        self._runs.pop(trial_id)
        self._tagged.discard(trial_id)
        self._terminal[trial_id] = run_id

    def _error_text(self, trial):
        return error_text(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        if trial.trial_id in self._runs:
            self._guard("the retry of trial " + trial.trial_id, self._end, trial.trial_id, "failed", "FAILED",
                        {"htnet.retried": "true", "htnet.error": self._error_text(trial)})

    def on_trial_error(self, iteration, trials, trial, **info):
        if trial.trial_id in self._runs:
            run_id = self._guard("the error of trial " + trial.trial_id, self._end, trial.trial_id, "failed",
                                 "FAILED", {"htnet.error": self._error_text(trial)})
            if run_id is not None:
                self._terminal[trial.trial_id] = run_id


def curve_of(result):
    """The intermediate curve of one result: `curve_<key>` at step = folds done."""
    return {f"curve_{k}": v for k, v in result.items()
            if k not in CURVE_SKIP and not k.startswith("htnet_") and _is_number(v)
            and (k.endswith(RESULT_KEYS) or k in ("train_loss", "fold_epochs"))}


def error_text(trial):
    try:
        error = trial.get_error()
    except Exception:  # noqa: BLE001
        error = None
    text = str(error) if error is not None else "the trial's worker failed"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else text)[:5000]


def backfill(client, experiment_id, parent_run_id, search_name, space, trials, histories=None,
             overrides=None, optuna_numbers=None):
    """Log to MLflow what Ray Tune recorded while MLflow did not answer.

    Every Ray trial that ended (TERMINATED or ERROR) without an ended, non-retried run gets its
    end logged: into its open run (the one that was RUNNING when MLflow went away) or, if it has
    none, into a new run (attempt + 1), with the curve from Ray's result.json (`histories`: trial
    id -> DataFrame of its results) and the files of its checkpoint. Nothing is logged twice: a
    trial with an ended run is left alone. Returns the trial ids filled in."""
    runs = {}
    for run in child_runs(client, experiment_id, parent_run_id):
        tags = run.data.tags
        if tags.get("htnet.trial_id") and tags.get("htnet.lost") != "true":
            runs.setdefault(tags["htnet.trial_id"], []).append(run)
    filled = []
    for trial in trials:
        if trial.status not in ("TERMINATED", "ERROR"):
            continue
        mine = sorted(runs.get(trial.trial_id, []), key=lambda r: int(r.data.tags.get("htnet.attempt", 1)))
        ended = [r for r in mine if r.data.tags.get("htnet.status") in TERMINAL
                 and r.data.tags.get("htnet.retried") != "true"]
        if ended:
            for run in ended:  # the status tag made it, the end of the run did not
                if run.info.status == "RUNNING":
                    retry(client.set_terminated, run.info.run_id,
                          "FAILED" if run.data.tags["htnet.status"] == "failed" else "FINISHED")
            continue
        result = dict(trial.last_result or {})
        open_runs = [r for r in mine if r.data.tags.get("htnet.status", "running") in ("running", "interrupted")
                     and r.data.tags.get("htnet.retried") != "true"]
        failures = getattr(getattr(trial, "run_metadata", None), "num_failures", 0) or 0
        tags = {"htnet.backfilled": "true", **({"htnet.failures": failures} if failures else {})}
        if open_runs:
            run_id = open_runs[-1].info.run_id
            if open_runs[-1].info.status != "RUNNING":
                retry(client.update_run, run_id, status="RUNNING")
        else:
            attempt = max([int(r.data.tags.get("htnet.attempt", 1)) for r in mine], default=0) + 1
            config = space.resolve(space.sampled(trial.config), overrides)
            resources = getattr(trial.placement_group_factory, "required_resources", {})
            run_id = create_trial_run(client, experiment_id, parent_run_id, search_name, space,
                                      trial.trial_id, config, attempt,
                                      (optuna_numbers or {}).get(trial.trial_id), resources,
                                      str(trial) + (f"-attempt{attempt}" if attempt > 1 else ""))
        if result.get("htnet_device"):
            tags.update({"htnet.device": result["htnet_device"], "htnet.node_id": result.get("htnet_node", ""),
                         "htnet.worker_pid": result.get("htnet_pid", "")})
        history = (histories or {}).get(trial.trial_id)
        if history is not None and len(history) and "step" in history:
            by_step = {}
            for row in history.to_dict("records"):
                if row.get("step") is not None and _is_number(row["step"]) \
                        and row.get("htnet_status") not in ("failed", "replayed"):
                    by_step[int(row["step"])] = curve_of(row)  # a retried step: the last report
            for step, curve in sorted(by_step.items()):
                log_metrics(client, run_id, curve, step=step)
        if trial.status == "ERROR":
            status = "failed"
            tags["htnet.error"] = error_text(trial)
        else:
            status = trial_status(result)
        checkpoint = getattr(trial, "checkpoint", None) if status == "finished" else None
        log_trial_end(client, run_id, trial.trial_id, result, status, checkpoint,
                      result.get("time_total_s"), tags)
        filled.append(trial.trial_id)
    return filled


def mark_interrupted(client, experiment_id, parent_run_id):
    """A search that stopped before its end (Ctrl+C): its open trial runs say so; a resumed
    search reopens them."""
    for run in child_runs(client, experiment_id, parent_run_id):
        if run.info.status == "RUNNING":
            set_tags(client, run.info.run_id, {"htnet.status": "interrupted"})
            retry(client.set_terminated, run.info.run_id, "KILLED")


def replay_results(client, experiment_id, parent_run_id, metric):
    """Results of trials whose MLflow run ended: a resumed search replays them if Ray's last
    snapshot still had them running (the driver died between the two)."""
    replay = {}
    for run in child_runs(client, experiment_id, parent_run_id):
        tags = run.data.tags
        if tags.get("htnet.status") in TERMINAL and tags.get("htnet.retried") != "true" \
                and tags.get("htnet.lost") != "true" and tags.get("htnet.trial_id"):
            value = run.data.metrics.get(metric, float("nan"))
            replay[tags["htnet.trial_id"]] = {
                metric: value, "step": run.data.metrics.get("folds_done", 0),
                "htnet_replayed_status": tags["htnet.status"]}
    return replay
