"""The per-trial PNGs: confusion matrices (one per protocol) and the learning curve.

matplotlib's object API (Figure, no pyplot): no global state, no display, safe in Ray workers.
"""
import numpy as np
from matplotlib.figure import Figure

from htnet.metrics import CLASS_NAMES, confusion, uf1_uar


def confusion_matrix_png(predictions, path, title=""):
    """predictions: the engine's long table (protocol, label, prediction, ...)."""
    protocols = list(dict.fromkeys(predictions["protocol"])) or ["(none)"]
    fig = Figure(figsize=(3.6 * len(protocols), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(protocols)))
    for ax, protocol in zip(axes, protocols):
        part = predictions[predictions["protocol"] == protocol]
        matrix = confusion(part["label"], part["prediction"]) if len(part) else np.zeros((3, 3), int)
        ax.imshow(matrix, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center",
                    color="white" if count > matrix.max() / 2 else "black")
        ticks = range(len(CLASS_NAMES))
        ax.set_xticks(ticks, CLASS_NAMES, rotation=30)
        ax.set_yticks(ticks, CLASS_NAMES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        uf1, uar = uf1_uar(part["label"], part["prediction"]) if len(part) else (np.nan, np.nan)
        ax.set_title(f"{protocol}: UF1 {uf1:.3f} UAR {uar:.3f}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)


def learning_curve_png(history, path, title=""):
    """history: subject, run (main|inner), epoch, train_loss, test_acc, val_uf1 (per fold)."""
    fig = Figure(figsize=(8, 3.4), layout="constrained")
    loss_ax, score_ax = fig.subplots(1, 2)
    for run, style in (("main", "-"), ("inner", "--")):
        part = history[history["run"] == run]
        if not len(part):
            continue
        by_epoch = part.groupby("epoch")
        loss_ax.plot(by_epoch["train_loss"].mean(), style, label=f"{run} train loss")
        if run == "main":
            score_ax.plot(by_epoch["test_acc"].mean(), style, label="test accuracy (mean over folds)")
        else:
            score_ax.plot(by_epoch["val_uf1"].mean(), style, label="inner validation UF1")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.legend(fontsize=8)
    score_ax.set_xlabel("epoch")
    score_ax.set_ylim(0, 1)
    score_ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
