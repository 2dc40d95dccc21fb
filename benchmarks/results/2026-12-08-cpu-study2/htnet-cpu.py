"""A small-HTNet study on the real composite (68 subjects) for a 2-core CPU (about an hour):
    python -m search run htnet-cpu --data ../shared/data/htnet_composite

htnet.py cut down to what trains on two cores: dim 24-32, block repeats (1, 1, 1) or (1, 1, 2), 60-100 epochs; the
inner protocol with 8 validation subjects and no patience (benchmarks/results/2026-12-07-inner-protocol). The ranges come from a full LOSO run of the small HTNet (benchmarks/results/
2026-12-02-cpu-study/README.md): training loss ~0 by epoch 100, test accuracy flat after epoch 70-100. A trial at 100
epochs (d32, blocks (1, 1, 2)) is 7-14 min on one core; dim 48 with blocks (2, 2, 2) ran 3-4x slower."""
description = ("small-HTNet study for a 2-core CPU - dim 24-32, heads, blocks, lr, batch size, epochs, dropout, "
               "weight decay")
num_samples = 10
max_concurrent_trials = 2
objective = "inner"                # leak-free; the paper protocol's numbers are recorded beside it
resources = {"cpu": 1, "gpu": 0}
max_failures = 1
sampler = {"type": "tpe", "seed": 0, "n_startup_trials": 8}
# successive halving as in htnet.py; `rejudge` since the cpu-study, where with 2 trials at a time the faster of the
# first pair had passed every rung unopposed
pruner = {"type": "successive_halving", "min_resource": 4, "reduction_factor": 3, "rejudge": True}
fixed = {"model": "htnet", "protocols": ["paper", "final", "inner"], "inner_val_subjects": 8,
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
