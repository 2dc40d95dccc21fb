"""A small-HTNet study on the real composite (68 subjects) sized for a 2-core CPU (about an hour):
    python -m search run htnet-cpu --data ../shared/data/htnet_composite

It is htnet.py cut down to what trains on two cores: the same model (NesT-style HTNet, patch 7, three hierarchies,
reference crops), protocols and objective, with dim 24-32 instead of 56-512, block repeats (1, 1, 1) or (1, 1, 2)
instead of (2, 2, 10), 60-100 epochs instead of 200-800, and the inner run early-stopped (patience 25 epochs), which
saves part of its cost. The ranges come from a full LOSO run of the small HTNet (dim 32, heads 2, blocks (1, 1, 2),
lr 5e-4, batch 256, 200 epochs; benchmarks/results/2026-12-02-cpu-study/README.md): its training loss reached ~0 by
epoch 100 and its mean test accuracy stopped rising after epoch 70-100, so lr spans 3e-4..3e-3 and epochs 60-100. A
full trial at 100 epochs is 6.8k fold-epochs of the main run plus up to as many of the inner run, about 60 ms each on
one core (d32, blocks (1, 1, 2)): 7-14 min. A first version with dim 48 and blocks (2, 2, 2) ran 3-4x slower per
fold-epoch and would not fit in 90 minutes."""
description = ("small-HTNet study for a 2-core CPU - dim 24-32, heads, blocks, lr, batch size, epochs, dropout, "
               "weight decay")
num_samples = 10
max_concurrent_trials = 2
objective = "inner"                # leak-free; the paper protocol's numbers are recorded beside it
resources = {"cpu": 1, "gpu": 0}
max_failures = 1
sampler = {"type": "tpe", "seed": 0, "n_startup_trials": 8}
# successive halving, rungs at 4, 12 and 36 of the 68 folds (one report per 4 folds, folds interleaved across the
# three datasets), as in htnet.py; `rejudge` since the cpu-study (its results folder has the file it ran): with 2
# trials at a time the faster of the first pair had passed every rung unopposed
pruner = {"type": "successive_halving", "min_resource": 4, "reduction_factor": 3, "rejudge": True}
fixed = {"model": "htnet", "protocols": ["paper", "final", "inner"], "inner_val_subjects": 3, "inner_patience": 25,
         "optimizer": "adam", "report_every": 4, "crop_mode": "reference",
         "model_config.num_hierarchies": 3, "model_config.patch_size": 7, "model_config.mlp_mult": 4}
BLOCKS = {"1-1-1": [1, 1, 1], "1-1-2": [1, 1, 2]}   # Optuna's choices are plain values: lists by name


def space(trial):
    return {"model_config.dim": trial.suggest_categorical("model_config.dim", [24, 32]),
            "model_config.heads": trial.suggest_categorical("model_config.heads", [2, 4]),
            "model_config.block_repeats": BLOCKS[trial.suggest_categorical("model_config.block_repeats", list(BLOCKS))],
            "lr": trial.suggest_float("lr", 3.0e-4, 3.0e-3, log=True),
            "batch_size": trial.suggest_categorical("batch_size", [128, 256]),
            "epochs": trial.suggest_categorical("epochs", [60, 100]),
            "weight_decay": trial.suggest_categorical("weight_decay", [0.0, 1.0e-4]),
            "model_config.dropout": trial.suggest_float("model_config.dropout", 0.0, 0.3)}
