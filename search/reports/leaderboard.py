"""The leaderboard: every trial of one or more searches, read back from MLflow, ranked by the objective."""
import collections
import dataclasses
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from htnet.errors import UserError, first_line
from htnet.io import parse_yaml, write_files
from htnet.loso import LosoConfig
from htnet.metrics import PROTOCOLS
from search import tracking
from search.driver.stores import default_tracking_uri
from search.reports.export import format_numbers, latex_table, markdown_table
from search.space import nest

DATASET_COLUMNS = (("full", "Full"), ("smic", "SMIC"), ("casme2", "CASME II"), ("samm", "SAMM"))
METRICS = tuple((key, f"{name} {m.upper()}", m) for key, name in DATASET_COLUMNS for m in ("uf1", "uar"))
METRIC_COLUMNS = tuple(column for _, column, _ in METRICS)  # "Full UF1", ..., "SAMM UAR"
MODEL_LABELS = {"htnet": "HTNet", "ststnet": "STSTNet", "offapexnet": "OFF-ApexNet",
                "dual_inception": "Dual-Inception"}
Store = collections.namedtuple("Store", "client experiment_id tracking_uri experiment")  # one MLflow experiment


def open_store(tracking_uri=None, experiment="htnet", create=False):
    """The MLflow client and experiment (default URI: $MLFLOW_TRACKING_URI, else ./mlflow.db)."""
    client = tracking.client_for(tracking_uri := tracking_uri or default_tracking_uri())
    if create:
        return Store(client, tracking.ensure_experiment(client, experiment, tracking_uri), tracking_uri, experiment)
    found = tracking.retry(client.get_experiment_by_name, experiment)
    if found is None or found.lifecycle_stage == "deleted":
        raise UserError(f"no MLflow experiment {experiment!r} at {tracking_uri} (run a search first, "
                        f"or pass --tracking-uri/--experiment)")
    return Store(client, found.experiment_id, tracking_uri, experiment)


def search_parents(store, names=None):
    """Parent runs of the named searches (all when none named; newest first); a name started twice gives its newest."""
    by_name = tracking.newest_run_ids(store.client, store.experiment_id, "tags.`htnet.role` = 'search'", "htnet.search")
    if missing := [n for n in names or () if n not in by_name]:
        raise UserError(f"no search named {missing[0]!r} in MLflow experiment {store.experiment!r} "
                        f"at {store.tracking_uri} (known: {', '.join(sorted(by_name)) or 'none'})")
    return [tracking.retry(store.client.get_run, by_name[n]) for n in names or by_name]


def model_label(model):
    return MODEL_LABELS.get(model, model)


def get_run(store, run_id, missing):
    """The MLflow run, or a UserError with the message `missing` when there is none."""
    try:
        return tracking.retry(store.client.get_run, run_id)
    except Exception:  # noqa: BLE001 - MLflow's not-found error
        raise UserError(missing) from None


def read_artifact_bytes(store, run_id, path, optional=False):
    """An artifact's bytes (htnet.io.parse_yaml checks a YAML's encoding and size); None if optional and missing."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="htnet-report-") as folder:
        try:
            return Path(store.client.download_artifacts(run_id, path, folder)).read_bytes()
        except Exception as e:  # noqa: BLE001 - MLflow raises several kinds for a missing file
            if optional:
                return None
            raise UserError(f"run {run_id}: cannot read artifact {path} ({first_line(e)[:200]})") from None


def read_csv_artifact(store, run_id, path):
    return pd.read_csv(io.BytesIO(read_artifact_bytes(store, run_id, path)))


def config_of_run(store, run):
    """The LOSO config of a run: its config.yaml artifact, else its params (YAML read with htnet.io's limits)."""
    run_id = run.info.run_id
    if (text := read_artifact_bytes(store, run_id, "config.yaml", optional=True)) is not None:
        if isinstance(config := parse_yaml(text, f"run {run_id}: config.yaml"), dict):
            return config
    if "model" not in run.data.params:
        raise UserError(f"run {run_id} has neither a config.yaml artifact nor LOSO params")
    known = {f.name for f in dataclasses.fields(LosoConfig)}
    return nest({k: parse_yaml(v, f"run {run_id}: param {k}") for k, v in run.data.params.items()
                 if k.split(".")[0] in known})


def best_run_id(store, parent, search, params=None):
    """The search's best finished trial (with `params`, as leaderboard's --param): its parent's tag, or the first."""
    if "htnet.best_run_id" in parent.data.tags and not params:
        return parent.data.tags["htnet.best_run_id"]
    table = leaderboard(store, [search], statuses=["finished"], params=params)
    return table.iloc[0]["run_id"] if len(table) else None


def leaderboard(store, searches=None, protocol="objective", statuses=None, params=None, top=None):
    """The ranked trials (latest attempts) of `searches` (all when empty). protocol: 'objective' (each search's),
    a protocol, or 'all' (a row per trial and protocol); statuses, params ({name: value}, text or number): filters."""
    if protocol not in ("objective", "all", *PROTOCOLS):
        raise UserError(f"--protocol must be objective, all, {', '.join(PROTOCOLS)}; got {protocol!r}")
    tables, key_params = [], ["model"]
    for parent in search_parents(store, searches):
        tags = parent.data.tags
        objective = tags.get("htnet.objective", "inner_val_uf1")
        trials = tracking.trial_table(store.client, store.experiment_id, parent.info.run_id, objective)
        values = trials.filter(regex=r"^params\.")  # a search recorded before htnet.sampled: those that vary
        names = tracking.sampled_names(trials) or [c[7:] for c in values if values[c].nunique(dropna=False) > 1]
        key_params += [name for name in names if name not in key_params]
        tables.append(trials.assign(
            search=tags.get("htnet.search"), objective=objective, objective_value=trials[objective],
            objective_protocol=tags.get("htnet.objective_protocol", objective.split("_")[0])))
    columns = ["rank", "search", "trial", "status", "objective", "objective_value", "protocol",
               *key_params, *METRIC_COLUMNS, "folds", "run_id"]
    if not tables:
        return pd.DataFrame(columns=columns)
    table = pd.concat(tables, ignore_index=True).rename(columns={"trial_id": "trial", "folds_done": "folds"})
    table = table.assign(**{name: table.get(f"params.{name}", np.nan) for name in key_params})
    if statuses:
        table = table[table["status"].isin(statuses)]
    for name, value in (params or {}).items():
        if name not in table:
            raise UserError(f"--param {name}: no trial has parameter {name!r} (key parameters: "
                            f"{', '.join(key_params)})")
        number = pd.to_numeric(pd.Series([value]), errors="coerce")[0]  # equal as text, or as numbers
        table = table[(table[name].astype(str) == str(value))
                      | np.isclose(pd.to_numeric(table[name], errors="coerce"), number, rtol=1e-9, atol=0)]
    table = tracking.ranked(table, "objective_value", ("search", "trial")).head(top or None)
    table["rank"] = np.arange(1, len(table) + 1)
    rows = [{**r, "protocol": p, **{column: r.get(f"metrics.{p}_{key}_{m}", np.nan) for key, column, m in METRICS}}
            for r in table.to_dict("records")
            for p in {"objective": [r["objective_protocol"]], "all": PROTOCOLS}.get(protocol, [protocol])]
    out = pd.DataFrame(rows, columns=columns)
    out["folds"] = pd.to_numeric(out["folds"], errors="coerce").astype("Int64")
    return out


def paper_form(table):
    """The leaderboard as a paper prints it: rank, status (unless all finished), model, key parameters ('-' where
    none), the objective, Full UF1/UAR; no ids, per-dataset or all-empty columns (the CSV and Markdown keep all)."""
    if not len(table):
        return table
    protocols, objectives = sorted(set(table["protocol"])), sorted(set(table["objective"]))
    first, last = table.columns.get_loc("protocol") + 1, table.columns.get_loc(METRIC_COLUMNS[0])
    key_params = [c for c in table.columns[first:last] if c != "model"]  # leaderboard() puts them there
    text, one = dashed(table), len(protocols) == 1
    form = pd.DataFrame({
        "Rank": text["rank"], "Status": text["status"],
        "Model": table["model"].map(lambda m: model_label(m) if isinstance(m, str) else "-"),
        **{c.removeprefix("model_config."): text[c] for c in key_params},
        **({objectives[0]: text["objective_value"]} if len(objectives) == 1 else
           {"Objective": text["objective"], "Objective value": text["objective_value"]}),
        **({} if one else {"Protocol": text["protocol"]}),
        **{f"UF1 ({protocols[0]})" if one else "UF1": text["Full UF1"],
           f"UAR ({protocols[0]})" if one else "UAR": text["Full UAR"]}})
    keep = [c for c in form if (form[c] != "-").any() and not (c == "Status" and set(table["status"]) == {"finished"})]
    return form[keep]


def dashed(table):
    """The numbers as text, '-' where there is none."""
    text = format_numbers(table, fixed=(*METRIC_COLUMNS, "objective_value")).astype(object)
    return text.where(text.notna() & (text != ""), "-")


def write_exports(table, csv=None, markdown=None, latex=None, caption=None, full=False):
    """Write the table to the requested files (the LaTeX in paper_form unless full); the paths written."""
    text = format_numbers(table, fixed=(*METRIC_COLUMNS, "objective_value"))
    texts = {csv: lambda: table.to_csv(index=False), markdown: lambda: markdown_table(text),
             latex: lambda: latex_table(text if full else paper_form(table), caption=caption)}
    write_files(written := {path: write() for path, write in texts.items() if path})
    return list(written)


def print_leaderboard(table, out=None, run_ids=False):
    out = out or sys.stdout
    if not len(table):
        return print("no trials match", file=out)
    shown = dashed(table.drop(columns=([] if run_ids else ["run_id"])
                              + (["search"] if table["search"].nunique() <= 1 else [])))
    with pd.option_context("display.width", 250, "display.max_columns", 60, "display.max_colwidth", 40):
        print(shown.to_string(index=False), file=out)
    if len(objectives := sorted(set(table["objective"]))) > 1:
        print(f"note: these searches have different objectives ({', '.join(objectives)}); the rank "
              f"compares objective values across them", file=out)
    if (table["status"] == "pruned").any():
        print("note: pruned trials' metrics cover only the folds done before they were stopped", file=out)
    if (table["protocol"] == "paper").any():
        print("note: protocol 'paper' picks each subject's epoch by its test accuracy (leaks the test "
              "subject); 'inner' is leak-free", file=out)
