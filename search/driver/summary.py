"""The end of a search and `search status`: the trial table from MLflow, the best configuration, the summary."""
import collections
import sys
from pathlib import Path

import mlflow.artifacts
import optuna
import pandas as pd
import yaml

from htnet.errors import UserError
from htnet.io import atomic_write, read_yaml
from search import tracking
from search.driver.stores import manifest_path, open_optuna_storage, read_manifest, search_names, write_manifest
from search.space import OBJECTIVES


def shown_path(path):
    """Relative to the working folder when it lies under it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def optuna_trials(manifest):
    """The trials of the search's Optuna study (none where the study is gone)."""
    try:
        study = optuna.load_study(study_name=manifest["name"], storage=open_optuna_storage(manifest["optuna_storage"]))
    except KeyError:
        return []
    return study.get_trials(deepcopy=False)


def summarize(storage, name):
    manifest = read_manifest(storage, name)
    metric = OBJECTIVES[manifest["settings"]["objective"]]
    client = tracking.client_for(manifest["tracking_uri"])
    table = tracking.trial_table(client, manifest["experiment_id"], manifest["parent_run_id"], metric)
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    ended = sum(counts.get(s, 0) for s in ("finished", "pruned", "failed"))
    return {"name": name, "manifest": manifest, "metric": metric, "table": table, "counts": counts, "client": client,
            "names": tracking.sampled_names(table), "complete": ended >= manifest["settings"]["num_samples"]}


def finish(storage, name, space, top, out):
    summary = summarize(storage, name)
    manifest, complete = summary["manifest"], summary["complete"]
    manifest["status"] = "finished" if complete else "interrupted"
    write_manifest(storage, name, manifest)
    best = write_best_config(storage, name, summary)
    if not complete:
        tracking.mark_interrupted(summary["client"], manifest["experiment_id"], manifest["parent_run_id"])
        summary = summarize(storage, name)  # with the trial runs it marked
    tracking.finish_parent_run(summary["client"], manifest["parent_run_id"], summary["table"], space.metric,
                               "FINISHED" if complete else "KILLED")
    print_summary(summary, top, best, out)
    return {**summary, "best_config": best}


def write_best_config(storage, name, summary):
    table, metric = summary["table"], summary["metric"]
    finished = table[table["status"] == "finished"] if len(table) else table
    if not len(finished) or finished[metric].isna().all():
        return None
    best = finished.loc[finished[metric].idxmax()]
    try:
        config = read_yaml(mlflow.artifacts.download_artifacts(run_id=best["run_id"], artifact_path="config.yaml",
                                                               tracking_uri=summary["manifest"]["tracking_uri"]))
    except Exception as e:  # noqa: BLE001
        print(f"warning: could not read the best trial's config.yaml: {e}", file=sys.stderr)
        return None
    with atomic_write(path := manifest_path(storage, name).with_suffix(".best.yaml")) as f:
        f.write(f"# best trial {best['trial_id']} of search {name}: {metric} = {best[metric]:.4f}\n")
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def browse_hint(tracking_uri, experiment):
    if tracking_uri.startswith(("http://", "https://")):
        return f"browse the runs: open {tracking_uri} (experiment {experiment})"
    if tracking_uri.startswith("sqlite:///"):
        tracking_uri = f"sqlite:///{shown_path(tracking_uri[len('sqlite:///'):])}"
    return (f"browse the runs: mlflow ui --backend-store-uri {tracking_uri}, then open http://127.0.0.1:5000 "
            f"(experiment {experiment})")


def print_summary(summary, top, best, out):
    table, metric, manifest, counts = summary["table"], summary["metric"], summary["manifest"], summary["counts"]
    shown = [f"{counts.get(s, 0)} {s}" for s in ("finished", "pruned", "failed")]
    shown += [f"{counts[s]} {s}" for s in ("running", "interrupted") if counts.get(s)]
    print(f"\nsearch {summary['name']} ({manifest['status']}): {', '.join(shown)} of "
          f"{manifest['settings']['num_samples']} trials; objective {metric} (max)", file=out)
    if len(table):
        columns = ["trial_id", "status", metric, "inner_full_uf1", "inner_full_uar",
                   "paper_full_uf1", "paper_full_uar", "folds_done", *summary["names"]]
        shown = table[[c for c in dict.fromkeys(columns) if c in table]].head(top)
        with pd.option_context("display.width", 250, "display.max_columns", 40):
            text = shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}")
        print(f"top trials:\n{text}", file=out)
    if best is not None:
        best, data = shown_path(best), shown_path(manifest["data_root"])
        print(f"best configuration: {best}\n  rerun it: python -m htnet train --config {best} --data {data}", file=out)
    if manifest["status"] != "finished":
        print(f"the search did not finish: resume it with `python -m search resume {summary['name']}`", file=out)
    print(browse_hint(manifest["tracking_uri"], manifest["experiment"]), file=out)
    print(f"inspect the Optuna study (pip install optuna-dashboard): optuna-dashboard "
          f"{manifest['optuna_storage']}", file=out)


def status(storage, name=None, top=10, out=None):
    """One search's summary and its Optuna study's trial states; without `name`, one line per search (a damaged
    record marked on its line, then one error line naming them)."""
    out = out or sys.stdout
    if name is not None:
        summary = summarize(Path(storage), name)
        best = manifest_path(storage, name).with_suffix(".best.yaml")
        print_summary(summary, top, best if best.is_file() else None, out)
        counts = collections.Counter(trial.state.name for trial in optuna_trials(summary["manifest"]))
        print("Optuna study: " + (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no trials"), file=out)
        return summary
    folder, names, damaged = Path(storage) / "searches", search_names(storage), []
    if not names:
        print(f"no searches in {folder}", file=out)
    for name in names:
        try:
            manifest = read_manifest(storage, name)
        except UserError as e:
            damaged.append(manifest_path(storage, name).name)
            print(f"{name}: DAMAGED: {e}", file=out)
            continue
        print(f"{name}: {manifest['status']}, started {manifest.get('created')}, "
              f"{manifest['settings']['num_samples']} trials of {manifest['space_file']}", file=out)
    if damaged:
        raise UserError(f"{folder}: damaged search record(s): {', '.join(damaged)} (the others are listed)")
    return names
