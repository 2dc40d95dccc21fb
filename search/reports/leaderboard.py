"""The leaderboard: every trial of one or more searches, read back from MLflow, ranked by the
search objective.

Reads the schema of search.tracking (docs/design.md): a parent run per search (tags
htnet.role=search, htnet.search, htnet.objective, htnet.objective_protocol; artifact space.yaml),
a child run per trial attempt (htnet.role=trial, htnet.trial_id, htnet.attempt, htnet.status;
params = the flattened LOSO config; metrics `{protocol}_{dataset}_{uf1|uar}`, inner_val_uf1,
folds_done). As in `search.tracking.trial_table`, a trial is its latest attempt, and runs of
trials lost with a killed driver are left out.

Ranking: finished trials first, by their objective (higher is better), then pruned trials (whose
metrics cover only the folds done before the pruner stopped them, so they are not comparable
with finished ones), running/interrupted, failed. Several searches with different objectives
are ranked on one `objective` column; the `objective` name column says which metric each is.
"""
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd

from htnet.errors import UserError
from htnet.metrics import PROTOCOLS
from search import tracking
from search.reports.export import format_numbers, latex_table, markdown_table

DATASET_COLUMNS = (("full", "Full"), ("smic", "SMIC"), ("casme2", "CASME II"), ("samm", "SAMM"))
METRIC_COLUMNS = tuple(f"{name} {m.upper()}" for _, name in DATASET_COLUMNS for m in ("uf1", "uar"))
STATUS_ORDER = {"finished": 0, "pruned": 1, "running": 2, "interrupted": 2, "failed": 3}


# ----------------------------------------------------------------------------- the MLflow store

@dataclass
class Store:
    client: object
    experiment_id: str
    tracking_uri: str
    experiment: str


def open_store(tracking_uri=None, experiment="htnet", create=False):
    """The MLflow client and experiment (default URI: $MLFLOW_TRACKING_URI, else ./mlflow.db)."""
    from search.driver.stores import default_tracking_uri

    tracking_uri = tracking_uri or default_tracking_uri()
    client = tracking.client_for(tracking_uri)
    if create:
        return Store(client, tracking.ensure_experiment(client, experiment, tracking_uri), tracking_uri, experiment)
    found = tracking.retry(client.get_experiment_by_name, experiment)
    if found is None or found.lifecycle_stage == "deleted":
        raise UserError(f"no MLflow experiment {experiment!r} at {tracking_uri} (run a search first, "
                        f"or pass --tracking-uri/--experiment)")
    return Store(client, found.experiment_id, tracking_uri, experiment)


def search_parents(store, names=None):
    """Parent runs of the named searches (all searches when names is empty), newest first.
    A name started twice (different MLflow stores merged) gives its newest parent."""
    runs = tracking.search_runs(store.client, store.experiment_id, "tags.`htnet.role` = 'search'")
    by_name = {}
    for run in runs:
        name = run.data.tags.get("htnet.search")
        if name and (name not in by_name or run.info.start_time > by_name[name].info.start_time):
            by_name[name] = run
    if names:
        missing = [n for n in names if n not in by_name]
        if missing:
            known = ", ".join(sorted(by_name)) or "none"
            raise UserError(f"no search named {missing[0]!r} in MLflow experiment {store.experiment!r} "
                            f"at {store.tracking_uri} (known: {known})")
        return [by_name[n] for n in names]
    return sorted(by_name.values(), key=lambda r: r.info.start_time, reverse=True)


def searched_names(store, parent):
    """The parameter names the search sampled (its space.yaml), or None if unreadable (missing,
    not YAML, an alias bomb: refused by htnet.io's limits)."""
    from htnet.io import parse_yaml

    run_id = parent.info.run_id
    try:
        space = parse_yaml(read_artifact_bytes(store, run_id, "space.yaml"), f"run {run_id}: space.yaml")
    except Exception:  # noqa: BLE001 - fall back to the parameters that vary
        return None
    section = space.get("space") if isinstance(space, dict) else None
    return [str(name) for name in section] if isinstance(section, dict) else None


def _download(store, run_id, path, read):
    """read(local_path) of a run's artifact, downloaded into a temporary folder."""
    import os
    import tempfile

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="htnet-report-") as folder:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                        tracking_uri=store.tracking_uri, dst_path=folder)
        except Exception as e:  # noqa: BLE001 - MLflow raises several kinds for a missing file
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise UserError(f"run {run_id}: cannot read artifact {path} ({first})") from None
        return read(local)


def read_artifact(store, run_id, path):
    """An artifact's text."""
    from pathlib import Path

    return _download(store, run_id, path, lambda local: Path(local).read_text())


def read_artifact_bytes(store, run_id, path):
    """An artifact's bytes (for htnet.io.parse_yaml, which checks the encoding and size)."""
    from pathlib import Path

    return _download(store, run_id, path, lambda local: Path(local).read_bytes())


def read_csv_artifact(store, run_id, path):
    return _download(store, run_id, path, pd.read_csv)


# ----------------------------------------------------------------------------- the table

def numeric_params(table, columns):
    """MLflow params are text: columns whose every value reads as a number become numbers."""
    for column in columns:
        if column not in table:
            continue
        numbers = pd.to_numeric(table[column], errors="coerce")
        if numbers.notna().sum() == table[column].notna().sum():
            table[column] = numbers
    return table


def trial_rows(store, parent):
    """One dict per trial (latest attempt) of a search's parent run."""
    rows = []
    for run in tracking.child_runs(store.client, store.experiment_id, parent.info.run_id):
        tags = run.data.tags
        if tags.get("htnet.role", "trial") != "trial" or tags.get("htnet.lost") == "true":
            continue
        rows.append({"run": run, "trial": tags.get("htnet.trial_id", run.info.run_id[:8]),
                     "attempt": int(tags.get("htnet.attempt", 1)),
                     "status": tags.get("htnet.status", "running")})
    latest_attempt = {}
    for row in sorted(rows, key=lambda r: r["attempt"]):
        latest_attempt[row["trial"]] = row
    return list(latest_attempt.values())


def leaderboard(store, searches=None, protocol="objective", statuses=None, params=None, top=None):
    """The ranked trials of `searches` (names; all when empty) as a DataFrame.

    protocol: 'objective' (each search's objective protocol), 'inner', 'paper', 'final' or 'all'
    (one row per trial and protocol, sharing the trial's rank). statuses: keep only these
    htnet.status values. params: {name: value} keeps trials whose parameter equals value
    (compared as text, and as numbers where both read as numbers)."""
    if protocol not in ("objective", "all", *PROTOCOLS):
        raise UserError(f"--protocol must be objective, all, {', '.join(PROTOCOLS)}; got {protocol!r}")
    parents = search_parents(store, searches)
    records, key_params = [], []
    for parent in parents:
        search = parent.data.tags.get("htnet.search")
        objective = parent.data.tags.get("htnet.objective", "inner_val_uf1")
        objective_protocol = parent.data.tags.get("htnet.objective_protocol", objective.split("_")[0])
        names = searched_names(store, parent)
        trials = trial_rows(store, parent)
        if names is None:  # parameters that vary across the search's trials
            values = pd.DataFrame([t["run"].data.params for t in trials])
            names = [c for c in values.columns if values[c].nunique(dropna=False) > 1]
        for name in ["model", *names]:
            if name not in key_params:
                key_params.append(name)
        for trial in trials:
            run = trial["run"]
            metrics, run_params = run.data.metrics, run.data.params
            record = {"search": search, "trial": trial["trial"], "status": trial["status"],
                      "objective": objective, "objective_value": metrics.get(objective, np.nan),
                      "objective_protocol": objective_protocol,
                      "folds": metrics.get("folds_done", np.nan), "run_id": run.info.run_id,
                      "_params": run_params, "_metrics": metrics}
            records.append(record)
    columns = ["rank", "search", "trial", "status", "objective", "objective_value", "protocol",
               *key_params, *METRIC_COLUMNS, "folds", "run_id"]
    if not records:
        return pd.DataFrame(columns=columns)
    for record in records:
        for name in key_params:
            record[name] = record["_params"].get(name)
    table = pd.DataFrame(records)
    if statuses:
        table = table[table["status"].isin(statuses)]
    for name, value in (params or {}).items():
        if name not in table:
            raise UserError(f"--param {name}: no trial has parameter {name!r} (key parameters: "
                            f"{', '.join(key_params)})")
        table = table[_param_matches(table[name], value)]
    table = table.assign(_order=table["status"].map(STATUS_ORDER).fillna(4),
                         _value=table["objective_value"].fillna(-np.inf))
    table = table.sort_values(["_order", "_value", "search", "trial"], ascending=[True, False, True, True],
                              kind="mergesort").reset_index(drop=True)
    table["rank"] = np.arange(1, len(table) + 1)
    if top:
        table = table.head(top)
    rows = []
    for record in table.to_dict("records"):
        shown = [record["objective_protocol"]] if protocol == "objective" else \
            list(PROTOCOLS) if protocol == "all" else [protocol]
        for p in shown:
            row = {k: record[k] for k in columns if k in record and k not in METRIC_COLUMNS}
            row["protocol"] = p
            for key, name in DATASET_COLUMNS:
                for m in ("uf1", "uar"):
                    row[f"{name} {m.upper()}"] = record["_metrics"].get(f"{p}_{key}_{m}", np.nan)
            rows.append(row)
    out = pd.DataFrame(rows, columns=columns)
    out["folds"] = pd.to_numeric(out["folds"], errors="coerce").astype("Int64")
    return numeric_params(out, key_params)


def _param_matches(series, value):
    text = series.astype(str) == str(value)
    numbers = pd.to_numeric(series, errors="coerce")
    try:
        number = float(value)
    except (TypeError, ValueError):
        return text
    return text | np.isclose(numbers.astype(float), number, rtol=1e-9, atol=0, equal_nan=False)


# ----------------------------------------------------------------------------- output

def display_columns(table, run_ids=False):
    drop = [] if run_ids else ["run_id"]
    shown = table.drop(columns=[c for c in drop if c in table])
    if shown["search"].nunique() <= 1:
        shown = shown.drop(columns=["search"])
    return shown


def write_exports(table, csv=None, markdown=None, latex=None, caption=None):
    """Write the table to the requested files (atomically); returns the paths written."""
    from htnet.io import atomic_write

    written = []
    if csv:
        with atomic_write(csv) as f:
            table.to_csv(f, index=False)
        written.append(csv)
    text_table = format_numbers(table, fixed=(*METRIC_COLUMNS, "objective_value"))
    if markdown:
        with atomic_write(markdown) as f:
            f.write(markdown_table(text_table))
        written.append(markdown)
    if latex:
        with atomic_write(latex) as f:
            f.write(latex_table(text_table, caption=caption))
        written.append(latex)
    return written


def print_leaderboard(table, out=None, run_ids=False):
    out = out or sys.stdout
    if not len(table):
        print("no trials match", file=out)
        return
    shown = display_columns(table, run_ids)
    shown = format_numbers(shown, fixed=(*METRIC_COLUMNS, "objective_value")).astype(object)
    shown = shown.where(shown.notna() & (shown != ""), "-")
    with pd.option_context("display.width", 250, "display.max_columns", 60, "display.max_colwidth", 40):
        print(shown.to_string(index=False), file=out)
    objectives = sorted(set(table["objective"]))
    if len(objectives) > 1:
        print(f"note: these searches have different objectives ({', '.join(objectives)}); the rank "
              f"compares objective values across them", file=out)
    if (table["status"] == "pruned").any():
        print("note: pruned trials' metrics cover only the folds done before they were stopped", file=out)
    leaky = table["protocol"] == "paper"
    if leaky.any():
        print("note: protocol 'paper' picks each subject's epoch by its test accuracy (leaks the test "
              "subject); 'inner' is leak-free", file=out)
