"""What an MLflow trial record holds (tags, metrics, statuses) and the one reader of runs and trials."""
import hashlib
import importlib.metadata
import math
import platform
import subprocess
from pathlib import Path

import pandas as pd
from mlflow.utils import get_results_from_paginated_fn

from htnet.data.release import CSV_NAME
from search.tracking.store import retry

TERMINAL = ("finished", "pruned", "failed")
STATUS_ORDER = {"finished": 0, "pruned": 1, "running": 2, "interrupted": 2, "failed": 3}
# a run's MLflow status, else FINISHED: MLflow has no 'pruned', so KILLED (stopped on purpose, not an error)
RUN_STATUS = {"failed": "FAILED", "pruned": "KILLED"}
TRIAL_TAGS = ("trial_id", "attempt", "status", "retried", "lost", "optuna_trial", "role", "sampled")  # htnet.<name>
SUMMARY_METRICS = ("inner_full_uf1", "inner_full_uar", "paper_full_uf1", "paper_full_uar", "final_full_uf1",
                   "folds_done")
PROVENANCE_TAGS = {"mlflow.source.git.commit": "htnet_git_commit", "htnet.git_dirty": "htnet_git_dirty",
                   "htnet.versions": "htnet_versions", "htnet.data_fingerprint": "htnet_data"}
# tag: the result key of a trial (search.trainable) that carries it
DEVICE_TAGS = {"htnet.device": "htnet_device", "htnet.node_id": "htnet_node", "htnet.worker_pid": "htnet_pid",
               "htnet.gpu": "htnet_gpu", **PROVENANCE_TAGS}
RESOLVED_PARAMS = {"resolved.fold_group_size": "htnet_fold_group_size"}  # param: the result key (search.trainable)
PARTIAL_PREFIX = "partial_"  # the metrics of a trial stopped before its last fold (pruned, failed)
SHORT_NAMES = {"model_config.dim": "d", "model_config.heads": "h", "batch_size": "bs", "epochs": "ep",
               "weight_decay": "wd", "model_config.dropout": "do", "model_config.block_repeats": "b",
               "model_config.patch_size": "p", "model_config.num_hierarchies": "L", "model_config.mlp_mult": "m"}

# the experiment's description, which the MLflow UI shows above its runs
EXPERIMENT_NOTE = """HTNet/STSTNet hyper-parameter searches (`python -m search`)
One parent run per search (tag `htnet.role` = search), one child run per trial attempt. Columns worth showing: the
objective (`inner_val_uf1` or `paper_full_uf1`; on a parent run `best_<objective>`), `inner_full_uf1`, `folds_done`,
tag `htnet.status`. A pruned trial's run is KILLED, named "... (pruned)", with its scores as `partial_<metric>`.
Every trial's objective by folds done: the chart of `running_<objective>`.
"""


def _git(*args):
    try:
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance(data=None):
    """What produced a run, as result keys (PROVENANCE_TAGS): git commit, dirty tree, versions, data fingerprint."""
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    versions = " ".join(f"{p}={importlib.metadata.version(p)}" for p in ("torch", "ray", "optuna", "mlflow"))
    keys = {"htnet_git_commit": _git("rev-parse", "HEAD") or "unknown",
            "htnet_git_dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
            "htnet_versions": f"{versions} python={platform.python_version()}"}
    if data is not None:
        csv = Path(data.source) / CSV_NAME
        table = csv.read_bytes() if csv.is_file() else "\n".join(map(str, zip(data.samples, data.labels))).encode()
        keys["htnet_data"] = (f"csv:{hashlib.sha256(table).hexdigest()[:12]} "
                              f"images:{hashlib.sha256(data.images.tobytes()).hexdigest()[:12]}")
    return keys


def provenance_tags(keys):
    return {tag: keys[key] for tag, key in PROVENANCE_TAGS.items() if key in keys}


def run_name(model, sampled, number, size=4):
    """A trial run's name to scan in `mlflow ui`: the model, its first sampled values: 'htnet d64 h3 lr3.1e-4 #07'."""
    def text(value):
        if isinstance(value, list):
            return "-".join(map(str, value))
        if isinstance(value, float):
            return f"{value:.1e}".replace("e-0", "e-") if value and abs(value) < 0.01 else f"{value:.2g}"
        return str(value)

    values = [f"{SHORT_NAMES.get(k, k.rsplit('.', 1)[-1])}{text(v)}" for k, v in sampled.items() if k != "model"]
    return " ".join([str(model), *values[:size], f"#{number:02d}" if isinstance(number, int) else f"#{number}"])


def trial_status(result, pruned=False):
    status = "pruned" if pruned else result.get("htnet_status")
    return status if status in ("pruned", "failed") else "finished"


def runs(client, experiment_id, filter_string="", columns=()):
    """Every run matching the filter, laid out as mlflow.search_runs (which reads only the global tracking URI)
    does: run_id, status, start_time (ms), tags.<k>, params.<k>, metrics.<k>; `columns` exist even if unset."""
    found = get_results_from_paginated_fn(lambda size, token: retry(
        client.search_runs, [experiment_id], filter_string, max_results=size, page_token=token), 1000)
    frame = pd.DataFrame([{"run_id": run.info.run_id, "status": run.info.status, "start_time": run.info.start_time,
                           **{f"{kind}.{k}": v for kind in ("tags", "params", "metrics")
                              for k, v in getattr(run.data, kind).items()}} for run in found])
    return frame.reindex(columns=list(dict.fromkeys(["run_id", "status", "start_time", *frame.columns, *columns])))


def newest_run_ids(client, experiment_id, filter_string, tag):
    """{value of tag `tag`: the id of its newest run} among the runs matching the filter, newest first."""
    frame = runs(client, experiment_id, filter_string, [f"tags.{tag}"])
    frame = frame[frame[f"tags.{tag}"].fillna("") != ""].sort_values("start_time", ascending=False, kind="stable")
    return frame.drop_duplicates(f"tags.{tag}").set_index(f"tags.{tag}")["run_id"].to_dict()


def ranked(table, value, ties=("trial_id",)):
    """Finished trials first by `value` (higher first), then pruned, running/interrupted, failed."""
    table = table.assign(_order=table["status"].map(STATUS_ORDER).fillna(4), _value=table[value].fillna(-math.inf))
    return (table.sort_values(["_order", "_value", *ties], ascending=[True, False, *[True] * len(ties)],
                              kind="mergesort").drop(columns=["_order", "_value"]).reset_index(drop=True))


def trial_table(client, experiment_id, parent_run_id, metric=None, param_names=(), latest=True):
    """A search's trial runs by attempt (lost ones left out): the htnet.* trial tags, run_id, run_status, `metric`,
    SUMMARY_METRICS, `param_names` and the sampled params as columns, then every metrics.<k> and params.<k>
    (numbers where all read as numbers; partial_<k> read as <k>). latest: each trial's last attempt, ranked."""
    named = {f"metrics.{m}": m for m in dict.fromkeys([metric, *SUMMARY_METRICS]) if m}
    named.update({f"params.{p}": p for p in param_names})
    frame = runs(client, experiment_id, f"tags.mlflow.parentRunId = '{parent_run_id}'",
                 [*(f"tags.htnet.{t}" for t in TRIAL_TAGS), *named])
    partial = frame.filter(regex=rf"^metrics\.{PARTIAL_PREFIX}")  # read as their metric: the status says partial
    for column in partial:
        whole = column.replace(PARTIAL_PREFIX, "", 1)
        frame[whole] = frame[whole].combine_first(partial[column]) if whole in frame else partial[column]
    frame = frame.drop(columns=partial.columns)
    for column in frame.filter(regex=r"^params\."):
        numbers = pd.to_numeric(frame[column], errors="coerce")
        if numbers.notna().sum() == frame[column].notna().sum():
            frame[column] = numbers
    frame = frame.rename(columns={"status": "run_status", **{f"tags.htnet.{t}": t for t in TRIAL_TAGS}})
    frame = frame[frame["trial_id"].notna() & frame["role"].fillna("trial").eq("trial") & ~frame["lost"].eq("true")]
    table = frame.assign(attempt=pd.to_numeric(frame["attempt"]).fillna(1).astype(int), retried=frame["retried"].eq(
        "true"), status=frame["status"].fillna("running"), **{name: frame[column] for column, name in named.items()})
    table = table[["trial_id", "attempt", "status", "run_id", "run_status", "retried", "optuna_trial", "sampled",
                   *named.values(), *frame.filter(regex=r"^(metrics|params)\.")]].sort_values("attempt", kind="stable")
    table = table.assign(**{n: table[f"params.{n}"] for n in sampled_names(table) if f"params.{n}" in table})
    return ranked(table.groupby("trial_id", sort=False).tail(1), metric) if latest else table.reset_index(drop=True)


def sampled_names(table):
    """The names a search's trials sampled (htnet.sampled: the keys space() returned), first seen first."""
    order = table.assign(_number=pd.to_numeric(table["optuna_trial"], errors="coerce"))
    texts = order.sort_values(["_number", "attempt"], kind="stable")["sampled"].dropna()
    return list(dict.fromkeys(name for text in texts for name in str(text).split(",") if name))
