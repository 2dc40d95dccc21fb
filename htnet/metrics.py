"""UF1 and UAR of predictions pooled over the LOSO folds, overall and per source dataset. A class absent
from the ground truth is left out of both means (the reference gives NaN or drops it; docs/design.md)."""
import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, f1_score, recall_score

NUM_CLASSES = 3
CLASS_NAMES = ("negative", "positive", "surprise")
DATASETS = ("smic", "casme2", "samm")
PROTOCOLS = ("paper", "final", "inner")


def uf1_uar(y_true, y_pred):
    """(UF1, UAR) over the classes present in y_true; (nan, nan) for no samples."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    present = np.unique(y_true).tolist()
    if not present:
        return float("nan"), float("nan")
    uf1 = f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
    uar = recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
    return float(uf1), float(uar)


def confusion(y_true, y_pred):
    """3x3 counts, rows = true class, columns = predicted class."""
    return confusion_matrix(y_true, y_pred, labels=list(range(NUM_CLASSES)))


def breakdown(predictions):
    """{'full': (uf1, uar), 'smic': ..., ...} for one protocol's pooled predictions."""
    out = {"full": uf1_uar(predictions["label"], predictions["prediction"])}
    for dataset in DATASETS:
        part = predictions[predictions["dataset"] == dataset]
        if len(part):
            out[dataset] = uf1_uar(part["label"], part["prediction"])
    return out


def compute_metrics(predictions):
    """Flat `{protocol}_{dataset}_{uf1|uar}` metrics from a long predictions table
    (columns sample, subject, dataset, label, protocol, prediction)."""
    return {f"{protocol}_{dataset}_{name}": value
            for protocol, part in predictions.groupby("protocol", sort=False)
            for dataset, scores in breakdown(part).items() for name, value in zip(("uf1", "uar"), scores)}


def per_subject_accuracy(predictions):
    """Accuracy per (protocol, subject), with the subject's dataset and sample count."""
    correct = predictions.assign(correct=predictions["label"] == predictions["prediction"])
    return (correct.groupby(["protocol", "subject", "dataset"], sort=False)
            .agg(samples=("correct", "size"), accuracy=("correct", "mean")).reset_index())


def summary_table(metrics, protocols=PROTOCOLS):
    """Rows = protocols, columns = Full/SMIC/CASME II/SAMM x UF1/UAR."""
    columns = [("full", "Full"), ("smic", "SMIC"), ("casme2", "CASME II"), ("samm", "SAMM")]
    rows = {protocol: {f"{name} {m.upper()}": metrics.get(f"{protocol}_{key}_{m}", np.nan)
                       for key, name in columns for m in ("uf1", "uar")}
            for protocol in protocols if f"{protocol}_full_uf1" in metrics}
    return pd.DataFrame.from_dict(rows, orient="index")
