"""The HTNet paper's hyper-parameter study on the real composite (68 subjects), for a GPU cluster:
    python -m search run htnet --address auto --data ~/data/htnet_composite --ray-storage s3://YOUR-BUCKET/htnet/ray

dim and heads mirror the paper's study; the rest widens it around the reference settings (lr 5e-5, batch 256,
800 epochs, patch 7, three hierarchies, block repeats (2, 2, 10)), a point of it (heads need not divide dim)."""
description = ("HTNet study - dim {56..512}, heads 1..6, lr, batch size, epochs, blocks, patch, mlp, dropout, "
               "weight decay")
num_samples = 64
max_concurrent_trials = 16
objective = "inner"                # leak-free; `--objective paper` steers by test-fold UF1 instead
resources = {"cpu": 1, "gpu": 0.25}   # four trials share a GPU
max_failures = 3                   # spot workers may be reclaimed
sampler = {"type": "tpe", "seed": 0, "n_startup_trials": 12}
# successive halving, rungs at 4, 12 and 36 folds: on 24-fold STSTNet searches (benchmarks/RESULTS.md) it spent
# 27-41% of the unpruned search's fold-epochs and found its best or came within 0.005; the median pruner spent 64-100%
pruner = {"type": "successive_halving", "min_resource": 4, "reduction_factor": 3}
fixed = {"model": "htnet", "protocols": ["paper", "final", "inner"], "inner_val_subjects": 8, "optimizer": "adam",
         "report_every": 4,        # 68 folds -> 17 intermediate results per trial
         "crop_mode": "reference"}
# block repeats per hierarchy level: as many as the levels (Optuna's choices are plain values: lists by name)
BLOCKS = {2: {"2-10": [2, 10], "2-4": [2, 4], "1-2": [1, 2]},
          3: {"2-2-10": [2, 2, 10], "2-2-4": [2, 2, 4], "1-1-2": [1, 1, 2]}}


def space(trial):
    config = {"model_config.dim": trial.suggest_categorical("model_config.dim", [56, 112, 196, 256, 392, 512]),
              "model_config.heads": trial.suggest_int("model_config.heads", 1, 6),
              "lr": trial.suggest_float("lr", 1.0e-5, 1.0e-3, log=True),
              "batch_size": trial.suggest_categorical("batch_size", [64, 128, 256]),
              "epochs": trial.suggest_categorical("epochs", [200, 400, 800]),
              "weight_decay": trial.suggest_categorical("weight_decay", [0.0, 1.0e-5, 1.0e-4, 1.0e-3])}
    levels = config["model_config.num_hierarchies"] = trial.suggest_categorical("model_config.num_hierarchies", [2, 3])
    blocks = BLOCKS[levels]   # one Optuna name per level: a name keeps one set of choices
    config["model_config.block_repeats"] = blocks[trial.suggest_categorical(f"block_repeats_{levels}_levels",
                                                                            list(blocks))]
    # each level halves the side of the patch grid: (28 / patch) / 2^(levels - 1) must be whole, so patch 14 (a 2x2
    # grid) takes two levels only; both patches divide the 28x28 image
    config["model_config.patch_size"] = trial.suggest_categorical("model_config.patch_size", [7, 14]) \
        if levels == 2 else 7
    config.update({"model_config.mlp_mult": trial.suggest_categorical("model_config.mlp_mult", [2, 4]),
                   "model_config.dropout": trial.suggest_float("model_config.dropout", 0.0, 0.5)})
    return config
