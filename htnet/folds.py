"""The LOSO folds and their seeds, a fold-model's seeded start, the protocols' epoch choices and what a fold
produced (FoldOutcome): the pieces htnet.engine trains with."""
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from htnet.errors import UserError
from htnet.metrics import CLASS_NAMES, uf1_uar
from htnet.models import create_model

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@dataclass
class Fold:
    subject: str
    train: np.ndarray        # sample indices the main model trains on
    test: np.ndarray
    inner_train: np.ndarray  # the inner run's training samples (train minus validation subjects)
    val: np.ndarray
    val_subjects: list


@dataclass
class FoldOutcome:
    subject: str
    test: np.ndarray
    chosen: dict             # protocol -> (epoch, predictions)
    inner: "InnerChoice | None"     # the inner run's validation curve: E*, its labels and predictions there
    history: list            # rows: run, epoch, train_loss, test_acc, val_uf1
    fold_epochs: int
    weights: dict | None = None  # state_dict of the weights protocol's epoch
    resumed: bool = False    # taken from an earlier attempt's folder (htnet.checkpoint), not trained now
    attempt: int = 1         # the attempt that trained it


def subject_seed(seed, subject, run):
    return (seed * 1_000_003 + zlib.crc32(f"{subject}/{run}".encode())) % 2**31


def check_fold_classes(data):
    """UserError naming the first fold whose training set lacks a class."""
    for subject in data.subject_ids:
        present = set(data.labels[data.subjects != subject].tolist())
        missing = sorted(set(range(len(CLASS_NAMES))) - present)
        if missing:
            raise UserError(f"fold {subject}: training set lacks class {missing[0]} ({CLASS_NAMES[missing[0]]})")


def visit_order(subjects, dataset_of, seed):
    """The order folds are trained in: the datasets interleaved in proportion (each one's subjects spread evenly,
    in a seeded order), so a partial run (a pruner's early rung) covers every dataset, not CASME II alone."""
    keyed = []
    for dataset in sorted(set(dataset_of[s] for s in subjects)):
        members = [s for s in subjects if dataset_of[s] == dataset]
        members = np.random.default_rng(subject_seed(seed, dataset, "order")).permutation(members).tolist()
        keyed += [((i + 0.5) / len(members), dataset, s) for i, s in enumerate(members)]
    return [s for _, _, s in sorted(keyed)]


def make_folds(data, config):
    """One fold per subject, in `visit_order`; the inner run's validation subjects are drawn from its training
    subjects (seeded), one per source dataset in turn so that validation spans the datasets."""
    subjects = data.subject_ids
    dataset_of = dict(zip(data.subjects.tolist(), data.datasets.tolist()))
    check_fold_classes(data)
    folds = []
    for subject in visit_order(subjects, dataset_of, config.seed):
        test, train = np.flatnonzero(data.subjects == subject), np.flatnonzero(data.subjects != subject)
        val_subjects = []
        if "inner" in config.protocols:
            others = [s for s in subjects if s != subject]
            if config.inner_val_subjects >= len(others):
                raise UserError(f"inner_val_subjects={config.inner_val_subjects} leaves no training "
                                f"subject in fold {subject} ({len(others)} others)")
            drawn = pd.DataFrame({"subject": np.random.default_rng(subject_seed(config.seed, subject, "val"))
                                  .permutation(others)})
            drawn["dataset"] = drawn.subject.map(dataset_of)
            drawn["turn"] = drawn.groupby("dataset").cumcount(ascending=False)   # each dataset's last drawn first
            val_subjects = drawn.sort_values(["turn", "dataset"]).subject[:config.inner_val_subjects].tolist()
        val = np.flatnonzero(np.isin(data.subjects, val_subjects))
        folds.append(Fold(subject, train, test, np.setdiff1d(train, val), val, val_subjects))
    return folds


def training_order(indices, labels, samples):
    """The reference reads u_train/<label>/ folder by folder: no shuffle means label-sorted."""
    return indices[np.lexsort((samples[indices], labels[indices]))]


def build_model(config, seed, device):
    torch.manual_seed(seed)
    return create_model(config.model, **config.model_config).to(device)


class InnerChoice:
    """The inner run's validation curve: E* = the epoch with the best validation UF1 (earlier
    wins ties); `done` once `patience` evaluations pass without improvement."""

    def __init__(self, labels, patience=None):
        self.labels, self.patience = labels, patience
        self.best, self.epoch, self.predictions, self.since_best = -1.0, None, None, 0

    def add(self, epoch, predictions):
        uf1 = uf1_uar(self.labels, predictions)[0]
        self.since_best += 1
        if uf1 > self.best:
            self.best, self.epoch, self.predictions, self.since_best = uf1, epoch, predictions, 0
        return uf1

    @property
    def done(self):
        return bool(self.patience) and self.since_best >= self.patience


class TestChoice:
    """The main run's test predictions by epoch: the `paper` epoch (best test accuracy, later wins
    ties), `final` (the last) and `inner` (E*, from the inner run)."""

    def __init__(self, labels):
        self.labels, self.by_epoch, self.best_acc, self.paper_epoch = labels, {}, -1.0, None

    def add(self, epoch, predictions):
        """(test accuracy, whether this epoch is now the paper protocol's choice)."""
        self.by_epoch[epoch] = predictions
        acc = float((predictions == self.labels).mean())
        if acc >= self.best_acc:
            self.best_acc, self.paper_epoch = acc, epoch
        return acc, self.paper_epoch == epoch

    def chosen(self, protocols, inner_epoch=None):
        epochs = {"paper": self.paper_epoch, "final": max(self.by_epoch), "inner": inner_epoch}
        return {p: (epochs[p], self.by_epoch[epochs[p]]) for p in protocols}
