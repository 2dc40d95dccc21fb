"""The plain engine: one fold after another, one model at a time, exactly the reference's recipe
(the yardstick the fold-batched engine is checked against)."""
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from htnet.errors import TrainingDiverged
from htnet.folds import (OPTIMIZERS, FoldOutcome, InnerChoice, TestChoice, build_model, snapshot, subject_seed,
                         training_order, weights_protocol)


def train_epochs(model, X, y, order, eval_sets, config, generator, desc=None):
    """Train `model` on samples `order`; after every `eval_every` epochs yield
    (epoch, mean train loss, {name: predicted labels for eval_sets[name]})."""
    optimizer = OPTIMIZERS[config.optimizer](model.parameters(), lr=config.lr,
                                              weight_decay=config.weight_decay)
    order = torch.as_tensor(order, device=X.device)
    for epoch in tqdm(range(1, config.epochs + 1), desc=desc, leave=False, disable=desc is None):
        model.train()
        if config.shuffle:
            order = order[torch.randperm(len(order), generator=generator).to(X.device)]
        loss_sum = torch.zeros((), device=X.device)
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size]
            loss = F.cross_entropy(model(X[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(batch)
        if epoch % config.eval_every and epoch != config.epochs:
            continue
        mean_loss = loss_sum.item() / len(order)
        if not np.isfinite(mean_loss):
            raise TrainingDiverged(f"training loss is {mean_loss} at epoch {epoch} (lr {config.lr} too high?)")
        model.eval()
        with torch.no_grad():
            predictions = {name: model(X[idx]).argmax(1).cpu().numpy() for name, idx in eval_sets.items()}
        yield epoch, mean_loss, predictions


def run_fold(fold, X, y, data, config, device, progress=False):
    """Train one fold's models (inner, then main) and choose each protocol's epoch."""
    history, fold_epochs, inner = [], 0, None
    if "inner" in config.protocols:
        seed = subject_seed(config.seed, fold.subject, "inner")
        model = build_model(config, seed, device)
        order = training_order(fold.inner_train, data.labels, data.samples)
        inner = InnerChoice(data.labels[fold.val], config.inner_patience)
        for epoch, loss, preds in train_epochs(model, X, y, order, {"val": fold.val}, config,
                                               torch.Generator().manual_seed(seed),
                                               desc=f"{fold.subject} inner" if progress else None):
            history.append(("inner", epoch, loss, np.nan, inner.add(epoch, preds["val"])))
            fold_epochs = epoch
            if inner.done:
                break

    seed = subject_seed(config.seed, fold.subject, "main")
    model = build_model(config, seed, device)
    order = training_order(fold.train, data.labels, data.samples)
    test, weights = TestChoice(data.labels[fold.test]), None
    for epoch, loss, preds in train_epochs(model, X, y, order, {"test": fold.test}, config,
                                           torch.Generator().manual_seed(seed),
                                           desc=f"{fold.subject}" if progress else None):
        acc, is_paper_best = test.add(epoch, preds["test"])
        history.append(("main", epoch, loss, acc, np.nan))
        if config.save_weights and (is_paper_best if weights_protocol(config) == "paper" else epoch == config.epochs):
            weights = snapshot(model)
    fold_epochs += config.epochs
    # Both runs evaluate at the same epochs, so E* is always one of the main run's.
    chosen = test.chosen(config.protocols, inner.epoch if inner else None)
    return FoldOutcome(fold.subject, fold.test, chosen, inner.labels if inner else None,
                       inner.predictions if inner else None, history, fold_epochs, weights)


def run_folds_plain(folds, X, y, data, config, device, progress=False):
    """The plain engine: one fold after another, one model at a time."""
    for fold in folds:
        yield run_fold(fold, X, y, data, config, device, progress=progress)
