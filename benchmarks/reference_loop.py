"""The reference-style LOSO loop, as the HTNet / STSTNet reference scripts train: per test subject a
fresh model, a torch DataLoader over a TensorDataset of the training samples (batch 256, no
shuffle, label-sorted like the reference's folder-by-folder read), Adam, and a test pass over the
subject (its own DataLoader) after every epoch. The yardstick for benchmarks/throughput.py.

    python -m benchmarks.reference_loop --model ststnet --epochs 800 [--subjects 4]

prints the `paper` (best test-accuracy epoch per subject) and `final` UF1/UAR and the time per
fold-epoch.
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from htnet.folds import subject_seed, training_order
from htnet.loso import LosoConfig, model_inputs, select_subjects
from htnet.metrics import uf1_uar
from htnet.models import create_model


def reference_fold(X, y, train_idx, test_idx, model="ststnet", model_config=None, epochs=800, lr=5e-5,
                   batch_size=256, seed=1, device="cpu"):
    """Train one fold the reference way; returns (per-epoch test predictions, seconds)."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    net = create_model(model, **(model_config or {})).to(device)
    X_train, y_train = torch.as_tensor(X[train_idx]), torch.as_tensor(y[train_idx])
    X_test, y_test = torch.as_tensor(X[test_idx]), torch.as_tensor(y[test_idx])
    train_dl = DataLoader(TensorDataset(X_train, y_train), batch_size=batch_size)
    test_dl = DataLoader(TensorDataset(X_test, y_test), batch_size=batch_size)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    predictions = []
    for _ in range(epochs):
        net.train()
        train_loss, num_train_correct = 0.0, 0
        for xb, yb in train_dl:
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad()
            yhat = net(xb)
            loss = F.cross_entropy(yhat, yb)
            loss.backward()
            optimizer.step()
            train_loss += loss.data.item() * xb.size(0)
            num_train_correct += (torch.max(yhat, 1)[1] == yb).sum().item()
        net.eval()
        epoch_predictions = []
        with torch.no_grad():
            for xb, yb in test_dl:
                yhat = net(xb.to(device))
                epoch_predictions.append(torch.max(yhat, 1)[1].cpu().numpy())
        predictions.append(np.concatenate(epoch_predictions))
    return predictions, time.perf_counter() - started


def reference_loso(data, model="ststnet", model_config=None, epochs=800, lr=5e-5, batch_size=256, seed=1,
                   device="cpu", subjects=None):
    """All folds; returns dict with paper/final UF1 and UAR, fold_epochs and seconds."""
    config = LosoConfig.from_dict({"model": model, "model_config": model_config or {}, "epochs": epochs,
                                   "protocols": ["paper", "final"], "subjects": subjects})
    data = select_subjects(data, config.subjects)
    X = np.ascontiguousarray(model_inputs(data, config))
    y = data.labels
    labels, paper, final, seconds = [], [], [], 0.0
    for subject in data.subject_ids:
        test = np.flatnonzero(data.subjects == subject)
        train = training_order(np.flatnonzero(data.subjects != subject), data.labels, data.samples)
        preds, spent = reference_fold(X, y, train, test, model, model_config, epochs, lr, batch_size,
                                      subject_seed(seed, subject, "main"), device)
        seconds += spent
        accs = [float((p == y[test]).mean()) for p in preds]
        best = max(range(len(accs)), key=lambda e: (accs[e], e))   # later epoch wins ties
        labels.append(y[test])
        paper.append(preds[best])
        final.append(preds[-1])
    labels = np.concatenate(labels)
    out = {"fold_epochs": len(data.subject_ids) * epochs, "seconds": seconds}
    for name, predicted in (("paper", paper), ("final", final)):
        out[f"{name}_full_uf1"], out[f"{name}_full_uar"] = uf1_uar(labels, np.concatenate(predicted))
    return out


def main():
    from htnet.data import load_release

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/htnet_composite")
    parser.add_argument("--model", default="ststnet")
    parser.add_argument("--epochs", type=int, default=800)
    parser.add_argument("--subjects", default=None)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    from htnet.loso import parse_subjects
    result = reference_loso(load_release(args.data), args.model, epochs=args.epochs, seed=args.seed,
                            subjects=parse_subjects(args.subjects))
    print({k: round(v, 4) for k, v in result.items()},
          f"{result['seconds'] / result['fold_epochs'] * 1000:.1f} ms per fold-epoch")


if __name__ == "__main__":
    main()
