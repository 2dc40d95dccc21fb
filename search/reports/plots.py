"""Plots of a search, logged as artifacts of its MLflow parent run (folder plots/):

- optimization_history.png, param_importances.png, parallel_coordinate.png: Optuna's
  matplotlib plots of the search's study (the study named like the search, in the Optuna
  storage the parent run names in its `optuna_storage` param). Parameter importances use
  Optuna's default evaluator (fANOVA) and need at least two finished trials.
- best_trial_per_subject_accuracy.png: per-subject accuracy of the best finished trial, one bar
  per protocol, subjects grouped and coloured by source dataset.
- rerun_confusion_matrices.png is added by `python -m search rerun --best SEARCH`.

(The per-trial PNGs, confusion_matrix.png and learning_curve.png, are search/plots.py's.)
"""
import sys
import warnings

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from htnet.errors import UserError
from htnet.metrics import per_subject_accuracy
from search import tracking
from search.reports.leaderboard import leaderboard, read_csv_artifact, search_parents

OPTUNA_PLOTS = ("optimization_history", "param_importances", "parallel_coordinate")
DATASET_COLORS = {"casme2": "tab:blue", "smic": "tab:orange", "samm": "tab:green"}


def per_subject_bars(predictions, path, title=""):
    """Bars of per-subject accuracy, one group per subject, one bar per protocol."""
    table = per_subject_accuracy(predictions)
    subjects = (table.drop_duplicates("subject").sort_values(["dataset", "subject"], kind="mergesort"))
    order = subjects["subject"].tolist()
    protocols = list(dict.fromkeys(table["protocol"]))
    width = 0.8 / max(1, len(protocols))
    fig = Figure(figsize=(max(8.0, 0.32 * len(order) * max(1, len(protocols)) / 1.5), 3.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(order))
    hatches = ["", "//", ".."]
    for i, protocol in enumerate(protocols):
        part = table[table["protocol"] == protocol].set_index("subject").reindex(order)
        colors = [DATASET_COLORS.get(d, "tab:gray") for d in subjects["dataset"]]
        ax.bar(x + (i - (len(protocols) - 1) / 2) * width, part["accuracy"].to_numpy(), width,
               color=colors, hatch=hatches[i % len(hatches)], edgecolor="black", linewidth=0.3,
               label=protocol)
    ax.set_xticks(x, order, rotation=90, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    handles = [Patch(facecolor="white", edgecolor="black", hatch=hatches[i % len(hatches)], label=p)
               for i, p in enumerate(protocols)]
    handles += [Patch(facecolor=c, label=d) for d, c in DATASET_COLORS.items() if d in set(subjects["dataset"])]
    ax.legend(handles=handles, fontsize=7, ncol=2, loc="upper right")
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=100)


def _log_axes(client, run_id, axes, name):
    import matplotlib.pyplot as plt

    ax = np.atleast_1d(axes).ravel()[0]
    figure = ax.get_figure(root=True)
    try:
        figure.set_size_inches(max(figure.get_size_inches()[0], 8), max(figure.get_size_inches()[1], 5))
        tracking.retry(client.log_figure, run_id, figure, f"plots/{name}.png", save_kwargs={"dpi": 100,
                                                                                          "bbox_inches": "tight"})
    finally:
        plt.close(figure)


def load_study(parent, search, storage_url=None):
    import optuna

    from search.driver.stores import open_optuna_storage

    url = storage_url or parent.data.params.get("optuna_storage")
    if not url:
        raise UserError(f"search {search!r}: its parent run names no optuna_storage (pass --optuna-storage)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=search, storage=open_optuna_storage(url))
    except KeyError:
        raise UserError(f"no Optuna study {search!r} in {url}") from None


def log_search_plots(store, search, optuna_storage=None, out=None):
    """Draw the plots of `search` and log them to its parent run. Returns {name: artifact path}
    of the plots made; a plot that cannot be drawn (too few trials, ...) is skipped with a note."""
    import matplotlib
    import optuna.visualization.matplotlib as ovm
    from optuna.exceptions import ExperimentalWarning

    from search.reports.rerun import log_png

    out = out or sys.stdout
    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps", "cairo", "template"):
        matplotlib.use("Agg")  # Optuna draws with pyplot; never open a window from a CLI
    parent = search_parents(store, [search])[0]
    run_id = parent.info.run_id
    objective = parent.data.tags.get("htnet.objective", "objective")
    made = {}
    try:
        study = load_study(parent, search, optuna_storage)
    except UserError as e:
        print(f"skipped the Optuna plots: {e}", file=out)
        study = None
    if study is not None:
        plots = {"optimization_history": lambda: ovm.plot_optimization_history(study, target_name=objective),
                 "param_importances": lambda: ovm.plot_param_importances(study, target_name=objective),
                 "parallel_coordinate": lambda: ovm.plot_parallel_coordinate(study, target_name=objective)}
        for name, draw in plots.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ExperimentalWarning)
                    axes = draw()
                _log_axes(store.client, run_id, axes, name)
                made[name] = f"plots/{name}.png"
            except (ValueError, RuntimeError, ZeroDivisionError) as e:
                print(f"skipped {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=out)
    best_id = parent.data.tags.get("htnet.best_run_id")
    if best_id is None:
        table = leaderboard(store, [search], statuses=["finished"])
        best_id = table.iloc[0]["run_id"] if len(table) else None
    if best_id is None:
        print("skipped the per-subject accuracy of the best trial: no finished trial", file=out)
    else:
        best = tracking.retry(store.client.get_run, best_id)
        try:
            predictions = read_csv_artifact(store, best_id, "predictions.csv")
        except UserError as e:
            print(f"skipped the per-subject accuracy of the best trial: {e}", file=out)
        else:
            title = (f"search {search}: best trial {best.data.tags.get('htnet.trial_id', best_id[:8])} "
                     f"({objective} {best.data.metrics.get(objective, float('nan')):.4f}), per-subject accuracy")
            log_png(store.client, run_id, lambda p: per_subject_bars(predictions, p, title),
                    "plots/best_trial_per_subject_accuracy.png")
            made["best_trial_per_subject_accuracy"] = "plots/best_trial_per_subject_accuracy.png"
    print(f"logged to the parent run {run_id} of search {search}: "
          + (", ".join(made.values()) or "nothing"), file=out)
    return made

