"""What an MLflow trial record holds (tags, metrics, statuses) and the one reader of runs and trials."""
import math

from search.tracking.store import retry

TERMINAL = ("finished", "pruned", "failed")
STATUS_ORDER = {"finished": 0, "pruned": 1, "running": 2, "interrupted": 2, "failed": 3}
TRIAL_TAGS = ("trial_id", "attempt", "status", "retried", "lost", "optuna_trial", "role")  # htnet.<name>
SUMMARY_METRICS = ("inner_full_uf1", "inner_full_uar", "paper_full_uf1", "paper_full_uar", "final_full_uf1",
                   "folds_done")


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def engine_metrics(result, extra):
    """A Ray result's engine metrics: the `{protocol}_{dataset}_{uf1|uar}` keys, inner_val_uf1 and `extra`."""
    return {k: v for k, v in result.items()
            if (k.endswith(("_uf1", "_uar")) or k in extra) and not k.startswith("htnet_") and is_number(v)}


def curve_of(result):
    """The intermediate curve of one Ray result: `curve_<key>`, logged at step = folds done."""
    return {f"curve_{k}": v for k, v in engine_metrics(result, ("train_loss", "fold_epochs")).items()}


def device_tags(result):
    if not result.get("htnet_device"):
        return {}
    return {"htnet.device": result["htnet_device"], "htnet.node_id": result.get("htnet_node", ""),
            "htnet.worker_pid": result.get("htnet_pid", "")}


def trial_status(result, pruned=False):
    if pruned or result.get("htnet_status") == "pruned":
        return "pruned"
    return "failed" if result.get("htnet_status") == "failed" else "finished"


def runs(client, experiment_id, filter_string="", columns=()):
    """Every run matching the filter (all pages), laid out as mlflow.search_runs(output_format="pandas")
    does: run_id, status, start_time (ms), tags.<k>, params.<k>, metrics.<k>; `columns` exist even if
    no run has them. (mlflow.search_runs itself reads only the global tracking URI.)"""
    import pandas as pd

    rows, token = [], None
    while True:
        page = retry(client.search_runs, [experiment_id], filter_string, max_results=1000, page_token=token)
        rows += [{"run_id": run.info.run_id, "status": run.info.status, "start_time": run.info.start_time,
                  **{f"{kind}.{k}": v for kind in ("tags", "params", "metrics")
                     for k, v in getattr(run.data, kind).items()}} for run in page]
        token = page.token
        if not token:
            frame = pd.DataFrame(rows)
            return frame.reindex(columns=list(dict.fromkeys(["run_id", "status", "start_time", *frame.columns,
                                                             *columns])))


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
    """The trial runs of a search (children with htnet.trial_id; runs of trials lost with a killed
    driver left out), by attempt: trial_id, attempt, status, run_id, run_status, retried,
    optuna_trial, then `metric`, SUMMARY_METRICS and `param_names` by their names, then every
    metrics.<k> and params.<k> (numbers where every value reads as one). latest: each trial's latest
    attempt only, ranked by `metric`."""
    import pandas as pd

    metrics = list(dict.fromkeys([metric, *SUMMARY_METRICS] if metric else SUMMARY_METRICS))
    wanted = [*(f"tags.htnet.{t}" for t in TRIAL_TAGS), *(f"metrics.{m}" for m in metrics),
              *(f"params.{p}" for p in param_names)]
    frame = runs(client, experiment_id, f"tags.mlflow.parentRunId = '{parent_run_id}'", wanted)
    for column in frame.columns[frame.columns.str.startswith("params.")]:  # text that reads as numbers: numbers
        numbers = pd.to_numeric(frame[column], errors="coerce")
        if numbers.notna().sum() == frame[column].notna().sum():
            frame[column] = numbers
    tag = {t: frame[f"tags.htnet.{t}"] for t in TRIAL_TAGS}
    table = pd.concat([
        pd.DataFrame({"trial_id": tag["trial_id"], "attempt": pd.to_numeric(tag["attempt"]).fillna(1).astype(int),
                      "status": tag["status"].fillna("running"), "run_id": frame["run_id"],
                      "run_status": frame["status"], "retried": tag["retried"].eq("true"),
                      "optuna_trial": tag["optuna_trial"]}),
        frame[[f"metrics.{m}" for m in metrics]].set_axis(metrics, axis=1),
        frame[[f"params.{p}" for p in param_names]].set_axis(list(param_names), axis=1),
        frame.filter(regex=r"^(metrics|params)\.")], axis=1)
    keep = tag["trial_id"].notna() & tag["role"].fillna("trial").eq("trial") & ~tag["lost"].eq("true")
    table = table[keep].sort_values("attempt", kind="stable")
    if not latest:
        return table.reset_index(drop=True)
    return ranked(table.groupby("trial_id", sort=False).tail(1), metric)
