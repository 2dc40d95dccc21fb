"""The one training loop (htnet.engine.train_group) with a group of one member is the reference recipe bit
for bit: a plain, seeded model; label-sorted (or seeded-shuffled) batches of the member's own samples; the
batch-mean cross-entropy; Adam; a test pass after every epoch. Checked against that recipe written out."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from htnet.engine import Member, run_fold, train_group
from htnet.folds import subject_seed, training_order
from htnet.loso import LosoConfig, make_folds, model_inputs
from htnet.metrics import uf1_uar
from htnet.models import create_model

TINY_HTNET = {"dim": 8, "heads": 2, "patch_size": 2, "num_hierarchies": 2, "block_repeats": [1, 1], "dropout": 0.3}


def reference_run(X, y, data, config, train, evaluate, seed):
    """Per epoch: (mean training loss, predictions on `evaluate`, state_dict)."""
    torch.manual_seed(seed)
    model = create_model(config.model, **config.model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(seed)
    order = torch.as_tensor(training_order(train, data.labels, data.samples))
    epochs = []
    for _ in range(config.epochs):
        model.train()
        if config.shuffle:
            order = order[torch.randperm(len(order), generator=generator)]
        total = torch.zeros(())
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size]
            loss = F.cross_entropy(model(X[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(batch)
        model.eval()
        with torch.no_grad():
            predicted = model(X[evaluate]).argmax(1).numpy()
        epochs.append((total.item() / len(order), predicted, {k: v.clone() for k, v in model.state_dict().items()}))
    return epochs


@pytest.mark.parametrize("shuffle", [False, True], ids=["sorted", "shuffled"])
@pytest.mark.parametrize("model, model_config", [("htnet", TINY_HTNET), ("ststnet", {"dropout": 0.5})],
                         ids=["htnet", "ststnet"])
def test_a_group_of_one_is_the_reference_recipe_bit_for_bit(synth_data, model, model_config, shuffle):
    data = synth_data.restrict(synth_data.pick_subjects(4))
    config = LosoConfig.from_dict({"model": model, "model_config": model_config, "epochs": 3, "lr": 3e-3,
                                   "batch_size": 16, "shuffle": shuffle, "save_weights": True, "engine": "plain",
                                   "protocols": ["paper", "final", "inner"], "inner_val_subjects": 1})
    X, y = torch.tensor(np.ascontiguousarray(model_inputs(data, config))), torch.tensor(data.labels)
    fold = make_folds(data, config)[0]
    for run, train, evaluate in (("main", fold.train, fold.test), ("inner", fold.inner_train, fold.val)):
        seed = subject_seed(config.seed, fold.subject, run)
        reference = reference_run(X, y, data, config, train, evaluate, seed)
        [(history, epochs, choice, weights)] = train_group([Member(0, fold, run, train, evaluate, seed)],
                                                           X, y, data, config, "cpu")
        assert epochs == config.epochs
        assert [row[2] for row in history] == [loss for loss, _, _ in reference]   # exact float equality
        if run == "main":
            for epoch, (_, predicted, _) in enumerate(reference, 1):
                assert np.array_equal(choice.by_epoch[epoch], predicted)
            paper_state = reference[choice.paper_epoch - 1][2]
            assert list(weights) == list(paper_state)
            assert all(torch.equal(weights[k], paper_state[k]) for k in paper_state)
        else:
            assert [row[4] for row in history] == [uf1_uar(data.labels[evaluate], p)[0] for _, p, _ in reference]
    # run_fold (nested LOSO's single fold) is the same loop: the same test predictions
    outcome = run_fold(fold, X, y, data, config, "cpu")
    main = reference_run(X, y, data, config, fold.train, fold.test, subject_seed(config.seed, fold.subject, "main"))
    assert np.array_equal(outcome.chosen["final"][1], main[-1][1])
