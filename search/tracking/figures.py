"""The per-trial PNGs: confusion matrices (one per protocol) and the learning curve (matplotlib's object API:
a Figure, never pyplot's current figure, so no global state and safe in Ray workers)."""
import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

from htnet.metrics import CLASS_NAMES, confusion, uf1_uar


def confusion_matrix_png(predictions, path=None, title=""):
    """predictions: the engine's long table (protocol, label, prediction, ...); the Figure, saved to `path` if given."""
    protocols = list(dict.fromkeys(predictions["protocol"])) or ["(none)"]
    fig = Figure(figsize=(3.6 * len(protocols), 3.6), layout="constrained")
    for ax, protocol in zip(np.atleast_1d(fig.subplots(1, len(protocols))), protocols):
        part = predictions[predictions["protocol"] == protocol]
        matrix = confusion(part["label"], part["prediction"]) if len(part) else np.zeros((3, 3), int)
        ConfusionMatrixDisplay(matrix, display_labels=CLASS_NAMES).plot(ax=ax, cmap="Blues", colorbar=False,
                                                                         xticks_rotation=30)
        uf1, uar = uf1_uar(part["label"], part["prediction"]) if len(part) else (np.nan, np.nan)
        ax.set_title(f"{protocol}: UF1 {uf1:.3f} UAR {uar:.3f}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def learning_curve_png(history, path, title=""):
    """history: subject, run (main|inner), epoch, train_loss, test_acc, val_uf1 (per fold); returns the Figure."""
    fig = Figure(figsize=(8, 3.4), layout="constrained")
    loss_ax, score_ax = fig.subplots(1, 2)
    for run, style, score, label in (("main", "-", "test_acc", "test accuracy (mean over folds)"),
                                     ("inner", "--", "val_uf1", "inner validation UF1")):
        by_epoch = history[history["run"] == run].groupby("epoch")
        if len(by_epoch):
            loss_ax.plot(by_epoch["train_loss"].mean(), style, label=f"{run} train loss")
            score_ax.plot(by_epoch[score].mean(), style, label=label)
    loss_ax.set(xlabel="epoch", ylabel="loss")
    score_ax.set(xlabel="epoch", ylabel="accuracy / UF1", ylim=(0, 1))
    for ax in (loss_ax, score_ax):
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    return fig
