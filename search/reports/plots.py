"""`python -m search plots SEARCH`: Optuna's plots and the best trial's per-subject accuracy, on the parent run."""
import sys
import warnings

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import optuna
import optuna.visualization.matplotlib as ovm
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from optuna.exceptions import ExperimentalWarning

from htnet.errors import UserError, first_line
from htnet.metrics import per_subject_accuracy
from search import tracking
from search.driver.console import search_console
from search.driver.stores import open_optuna_storage
from search.reports.leaderboard import best_run_id, open_store, read_csv_artifact, search_parents

DATASET_COLORS = {"casme2": "tab:blue", "smic": "tab:orange", "samm": "tab:green"}
HATCHES = ("", "//", "..")


def per_subject_bars(predictions, title=""):
    """A Figure: per-subject accuracy, one group per subject (coloured by dataset), one bar per protocol."""
    table = per_subject_accuracy(predictions)
    subjects = table.drop_duplicates("subject").sort_values(["dataset", "subject"], kind="mergesort")
    order, protocols = subjects["subject"].tolist(), list(dict.fromkeys(table["protocol"]))
    width, x = 0.8 / max(1, len(protocols)), np.arange(len(order))
    fig = Figure(figsize=(max(8.0, 0.32 * len(order) * max(1, len(protocols)) / 1.5), 3.8), layout="constrained")
    ax, colors = fig.subplots(), [DATASET_COLORS.get(d, "tab:gray") for d in subjects["dataset"]]
    for i, protocol in enumerate(protocols):
        part = table[table["protocol"] == protocol].set_index("subject").reindex(order)
        ax.bar(x + (i - (len(protocols) - 1) / 2) * width, part["accuracy"].to_numpy(), width, color=colors,
               hatch=HATCHES[i % 3], edgecolor="black", linewidth=0.3, label=protocol)
    ax.set_xticks(x, order, rotation=90, fontsize=7)
    ax.set(ylim=(0, 1.05), ylabel="accuracy")
    ax.set_title(title, fontsize=9)
    handles = [Patch(facecolor="white", edgecolor="black", hatch=HATCHES[i % 3], label=p)
               for i, p in enumerate(protocols)]
    handles += [Patch(facecolor=c, label=d) for d, c in DATASET_COLORS.items() if d in set(subjects["dataset"])]
    fig.legend(handles=handles, fontsize=7, loc="outside right upper")  # beside the axes: bars reach the top
    return fig


def _log_figure(client, run_id, figure, name):
    try:
        tracking.retry(client.log_figure, run_id, figure, f"plots/{name}.png",
                       save_kwargs={"dpi": 100, "bbox_inches": "tight"})
    finally:
        plt.close(figure)  # Optuna draws with pyplot, which keeps its figures until closed


def _optuna_plots(store, parent, search, storage_url, objective, out):
    """Optuna's plots of the search's study on its parent run; returns {name: artifact path}."""
    if not (url := storage_url or parent.data.params.get("optuna_storage")):
        raise UserError(f"search {search!r}: its parent run names no optuna_storage (pass --optuna-storage)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=search, storage=open_optuna_storage(url))
    except KeyError:
        raise UserError(f"no Optuna study {search!r} in {url}") from None
    made = {}
    for name in ("optimization_history", "param_importances", "parallel_coordinate"):  # importances: 2+ trials
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                axes = getattr(ovm, f"plot_{name}")(study, target_name=objective)
            figure = np.atleast_1d(axes).ravel()[0].get_figure(root=True)
            figure.set_size_inches(np.maximum(figure.get_size_inches(), (8, 5)))
            _log_figure(store.client, parent.info.run_id, figure, name)
            made[name] = f"plots/{name}.png"
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            print(f"skipped {name}: {first_line(e)}", file=out)
    return made


def log_search_plots(store, search, optuna_storage=None, out=None):
    """Draw the plots of `search` into plots/ of its parent run; returns {name: artifact path}. A plot that cannot
    be drawn (too few trials, ...) is skipped with a note."""
    out = out or sys.stdout
    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo", "template"):
        matplotlib.use("Agg")  # Optuna draws with pyplot; never open a window from a CLI
    parent = search_parents(store, [search])[0]
    run_id, objective = parent.info.run_id, parent.data.tags.get("htnet.objective", "objective")
    try:
        made = _optuna_plots(store, parent, search, optuna_storage, objective, out)
    except UserError as e:
        print(f"skipped the Optuna plots: {e}", file=out)
        made = {}
    try:
        if (best_id := best_run_id(store, parent, search)) is None:
            raise UserError("no finished trial")
        predictions = read_csv_artifact(store, best_id, "predictions.csv")
    except UserError as e:
        print(f"skipped the per-subject accuracy of the best trial: {e}", file=out)
    else:
        best = tracking.retry(store.client.get_run, best_id)
        title = (f"search {search}: best trial {best.data.tags.get('htnet.trial_id', best_id[:8])} "
                 f"({objective} {best.data.metrics.get(objective, float('nan')):.4f}), per-subject accuracy")
        _log_figure(store.client, run_id, per_subject_bars(predictions, title), "best_trial_per_subject_accuracy")
        made["best_trial_per_subject_accuracy"] = "plots/best_trial_per_subject_accuracy.png"
    print(f"logged to the parent run {run_id} of search {search}: " + (", ".join(made.values()) or "nothing"),
          file=out)
    return made


def plot_finished_search(summary):
    """The plots of a search that `run`/`resume` finished, its libraries' warnings in the search's log as its own
    were; a failure is a warning (plots are a convenience: never fail a finished search)."""
    manifest = summary["manifest"]
    with search_console(manifest["log"], manifest.get("verbose", 1)):
        try:
            store = open_store(manifest["tracking_uri"], manifest["experiment"])
            log_search_plots(store, summary["name"], manifest["optuna_storage"])
        except Exception as e:  # noqa: BLE001
            print(f"warning: could not log the search's plots: {first_line(e)}")
