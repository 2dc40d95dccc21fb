"""The MLflow store: one client per URI, retries, and the one line a user sees when it is gone."""
import os
import re
import time
from pathlib import Path

import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

from htnet.errors import UserError, first_line
from htnet.io import file_lock

# MLflow's HTTP client retries a dead server for minutes by default; the driver falls back on Ray's records
# instead, so a few quick tries. The environment wins.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
FINAL_ERROR_CODES = ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST")
SQLITE = "sqlite:///"
_checked_stores = set()  # sqlite stores this process has opened (MLflow caches the store per URI)


def client_for(tracking_uri):
    """The client of a store; a new sqlite file is migrated under a lock (alembic crashes on two at once)."""
    os.environ.update({k: v for k, v in HTTP_DEFAULTS.items() if k not in os.environ})
    if str(tracking_uri).startswith(SQLITE) and tracking_uri not in _checked_stores:
        path = Path(tracking_uri.removeprefix(SQLITE))
        try:
            with file_lock(path.parent / f".{path.name}.lock"):
                MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)  # builds the store
        except OSError as e:
            raise UserError(f"MLflow store {path}: cannot open it ({e.strerror})") from None
        except mlflow_errors() as e:
            raise UserError(f"MLflow store {path}: not a usable MLflow database "
                            f"({first_line(getattr(e, 'orig', None) or short_reason(e))[:200]}); move it "
                            f"away or pass another --tracking-uri") from None
        _checked_stores.add(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


def mlflow_errors():
    """What a failing store raises (the HTTP client wraps connection errors in MlflowException)."""
    return (MlflowException, requests.RequestException, SQLAlchemyError)


def short_reason(error):
    """A few words for why an MLflow call failed (its messages quote whole URLs and retry states)."""
    if any(s in str(error) for s in ("Connection refused", "NewConnectionError", "RemoteDisconnected")):
        return "connection refused"
    return "timed out" if "timed out" in str(error) or "Timeout" in str(error) else first_line(error)[:200]


def unreachable(tracking_uri, timeout=5.0):
    """Why the store cannot be used now, in a few words, or None (one HTTP try; a sqlite file's folder)."""
    if str(tracking_uri).startswith(("http://", "https://")):
        try:
            response = requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=timeout)
        except requests.RequestException as e:
            return "connection refused" if isinstance(e, requests.ConnectionError) else type(e).__name__
        return f"HTTP {response.status_code}" if response.status_code in (502, 503, 504) else None
    folder = Path(tracking_uri.removeprefix(SQLITE)).parent
    if not tracking_uri.startswith(SQLITE) or (folder.is_dir() and os.access(folder, os.W_OK)):
        return None
    return f"folder {folder} is not writable" if folder.is_dir() else f"folder {folder} does not exist"


def unreachable_message(tracking_uri, reason, search_name=None, kept=None):
    """The one line a user sees when MLflow is gone: what failed, what is kept (no search yet: none), what to do."""
    http = str(tracking_uri).startswith(("http://", "https://"))
    what = f"MLflow tracking server at {tracking_uri}" if http else f"MLflow store {tracking_uri}"
    if search_name is None:
        return f"{what} unreachable ({reason}); {'start it or ' if http else ''}pass another --tracking-uri"
    return (f"{what} unreachable ({reason}): results are kept in {kept}; restart it and run "
            f"`python -m search resume {search_name}` to fill MLflow in")


def check_reachable(tracking_uri):
    """UserError (one line) unless the store answers: checked before a search starts."""
    if (reason := unreachable(tracking_uri)) is not None:
        raise UserError(unreachable_message(tracking_uri, reason))


def retry(fn, *args, tries=6, **kwargs):
    """Call an MLflow client method, retrying transient failures (a busy sqlite file); final ones raise at once."""
    for attempt in range(tries):
        try:
            return fn(*args, **kwargs)
        except (MlflowException, OSError) as e:
            if attempt == tries - 1 or getattr(e, "error_code", None) in FINAL_ERROR_CODES:
                raise
            time.sleep(min(8.0, 0.25 * 2 ** attempt))


def ensure_experiment(client, name, tracking_uri):
    """The experiment's id, created if needed (a sqlite store's artifacts: mlruns/<experiment>/ beside it)."""
    experiment = retry(client.get_experiment_by_name, name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            retry(client.restore_experiment, experiment.experiment_id)
        return experiment.experiment_id
    folder = Path(tracking_uri.removeprefix(SQLITE)).resolve().parent / "mlruns" / re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    try:
        return retry(client.create_experiment, name,
                     artifact_location=folder.as_uri() if tracking_uri.startswith(SQLITE) else None)
    except MlflowException:  # another search created it at the same moment
        return retry(client.get_experiment_by_name, name).experiment_id
