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
TRIAL_TAGS = ("trial_id", "attempt", "status", "retried", "lost", "optuna_trial", "role", "sampled")  # htnet.<name>
# the result's fold-epochs (as a run never stopped), trained by this attempt, by every attempt, and resumed
FOLD_EPOCHS = ("fold_epochs", "fold_epochs_attempt", "fold_epochs_trained", "fold_epochs_resumed")
SUMMARY_METRICS = ("inner_full_uf1", "inner_full_uar", "paper_full_uf1", "paper_full_uar", "final_full_uf1",
                   "folds_done")
DEVICE_TAGS = {"htnet.device": "htnet_device", "htnet.node_id": "htnet_node", "htnet.worker_pid": "htnet_pid",
               "htnet.gpu": "htnet_gpu"}
PROVENANCE_TAGS = {"mlflow.source.git.commit": "htnet_git_commit", "htnet.git_dirty": "htnet_git_dirty",
                   "htnet.versions": "htnet_versions", "htnet.data_fingerprint": "htnet_data"}
DEVICE_TAGS.update(PROVENANCE_TAGS)   # a trial's result carries them (search.trainable), as its device
RESOLVED_PARAMS = {"resolved.fold_group_size": "htnet_fold_group_size"}  # param: the result key (search.trainable)
PARTIAL_PREFIX = "partial_"  # the metrics of a trial stopped before its last fold (pruned, failed)


def provenance(data=None):
    """What produced a run, as result keys (PROVENANCE_TAGS): git commit, dirty tree, versions, data fingerprint."""
    def git(*args):
        try:
            done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                                  text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    versions = [f"{p}={importlib.metadata.version(p)}" for p in ("torch", "ray", "optuna", "mlflow")]
    keys = {"htnet_git_commit": commit or "unknown",
            "htnet_git_dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
            "htnet_versions": " ".join([*versions, f"python={platform.python_version()}"])}
    if data is not None:
        csv = Path(data.source) / CSV_NAME
        table = csv.read_bytes() if csv.is_file() else "\n".join(map(str, zip(data.samples, data.labels))).encode()
        keys["htnet_data"] = (f"csv:{hashlib.sha256(table).hexdigest()[:12]} "
                              f"images:{hashlib.sha256(data.images.tobytes()).hexdigest()[:12]}")
    return keys


def provenance_tags(keys):
    """`provenance`'s result keys as the MLflow tags they stand for."""
    return {tag: keys[key] for tag, key in PROVENANCE_TAGS.items() if key in keys}


SHORT_NAMES = {"model_config.dim": "d", "model_config.heads": "h", "batch_size": "bs", "epochs": "ep",
               "weight_decay": "wd", "model_config.dropout": "do", "model_config.block_repeats": "b",
               "model_config.patch_size": "p", "model_config.num_hierarchies": "L", "model_config.mlp_mult": "m"}


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


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curve_of(result, metric):
    """What one intermediate Ray result adds to the trial's history, at step = folds done (the charts' x axis):
    running_<objective>, apart from the objective's own key, which only a complete trial has."""
    values = {f"running_{metric}": result.get(metric), "folds_done": result.get("step")}
    return {k: v for k, v in values.items() if is_number(v)}


def end_metrics(result, status):
    """The end-of-trial metrics: the engine's `{protocol}_{dataset}_{uf1|uar}` results of a trial that did not
    finish all its folds are PARTIAL_PREFIX-ed, so the complete-result columns hold complete results only."""
    prefix, scores = "" if status == "finished" else PARTIAL_PREFIX, ("_uf1", "_uar")
    return {**{prefix + k if k.endswith(scores) else k: v for k, v in result.items()
               if (k.endswith(scores) or k in ("wall_time_s", *FOLD_EPOCHS)) and not k.startswith("htnet_")
               and is_number(v)}, "folds_done": result.get("step", 0)}


def device_tags(result):
    return {tag: result.get(key, "") for tag, key in DEVICE_TAGS.items()} if result.get("htnet_device") else {}


def resolved_params(result):
    """The settings the engine resolved at run time (search.trainable), as params beside the config's own."""
    return {param: result[key] for param, key in RESOLVED_PARAMS.items() if result.get(key) is not None}


def trial_status(result, pruned=False):
    status = "pruned" if pruned else result.get("htnet_status")
    return status if status in ("pruned", "failed") else "finished"


def run_status(status):
    """The MLflow run status of a trial's htnet.status. MLflow has no 'pruned': KILLED (stopped on purpose,
    not an error) shows it apart from FINISHED; the run's name and htnet.status say it was pruned."""
    return {"failed": "FAILED", "pruned": "KILLED"}.get(status, "FINISHED")


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
    """A search's trial runs (lost ones left out) by attempt: trial_id, attempt, status, run_id, run_status, retried,
    optuna_trial, sampled, `metric`, SUMMARY_METRICS, `param_names` and the sampled ones (sampled_names), every
    metrics.<k> and params.<k> (numbers where all read as numbers); partial_<k> metrics as <k>. latest: each trial's
    latest attempt, ranked by `metric`."""
    metrics = list(dict.fromkeys([metric, *SUMMARY_METRICS] if metric else SUMMARY_METRICS))
    named = {**{f"metrics.{m}": m for m in metrics}, **{f"params.{p}": p for p in param_names}}
    frame = runs(client, experiment_id, f"tags.mlflow.parentRunId = '{parent_run_id}'",
                 [*(f"tags.htnet.{t}" for t in TRIAL_TAGS), *named])
    partial = frame.filter(regex=rf"^metrics\.{PARTIAL_PREFIX}")  # read as their metric: the status says partial
    for column in partial:
        whole = column.replace(PARTIAL_PREFIX, "", 1)
        frame[whole] = frame[whole].combine_first(partial[column]) if whole in frame else partial[column]
    frame = frame.drop(columns=partial.columns)
    for column in frame.columns[frame.columns.str.startswith("params.")]:
        numbers = pd.to_numeric(frame[column], errors="coerce")
        if numbers.notna().sum() == frame[column].notna().sum():
            frame[column] = numbers
    tag = {t: frame[f"tags.htnet.{t}"] for t in TRIAL_TAGS}
    table = pd.concat([
        pd.DataFrame({"trial_id": tag["trial_id"], "attempt": pd.to_numeric(tag["attempt"]).fillna(1).astype(int),
                      "status": tag["status"].fillna("running"), "run_id": frame["run_id"],
                      "run_status": frame["status"], "retried": tag["retried"].eq("true"),
                      "optuna_trial": tag["optuna_trial"], "sampled": tag["sampled"]}),
        frame[list(named)].set_axis(list(named.values()), axis=1), frame.filter(regex=r"^(metrics|params)\.")], axis=1)
    keep = tag["trial_id"].notna() & tag["role"].fillna("trial").eq("trial") & ~tag["lost"].eq("true")
    table = table[keep].sort_values("attempt", kind="stable")
    table = table.assign(**{n: table[f"params.{n}"] for n in sampled_names(table) if f"params.{n}" in table})
    return ranked(table.groupby("trial_id", sort=False).tail(1), metric) if latest else table.reset_index(drop=True)


def sampled_names(table):
    """The parameter names a search's trials sampled (each run's htnet.sampled: the keys its space() returned), in
    the order first seen (by Optuna trial number)."""
    order = table.assign(_number=pd.to_numeric(table["optuna_trial"], errors="coerce"))
    texts = order.sort_values(["_number", "attempt"], kind="stable")["sampled"].dropna()
    return list(dict.fromkeys(name for text in texts for name in str(text).split(",") if name))
