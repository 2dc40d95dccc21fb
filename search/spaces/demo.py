"""A small search on the built-in synthetic data, sized for a laptop or 2 CPU cores (a few minutes):
python -m search run (or: python -m search run demo)."""
description = "demo search over HTNet and STSTNet, sized for 2 CPU cores"
num_samples = 12
max_concurrent_trials = 2
objective = "inner"                # leak-free: the inner protocol's validation UF1
resources = {"cpu": 1, "gpu": 0}
max_failures = 1
sampler = {"type": "tpe", "seed": 0, "n_startup_trials": 5}
pruner = {"type": "median", "n_startup_trials": 3, "n_warmup_steps": 3}
data = {"synthetic_subjects": 3, "synthetic_seed": 0}
fixed = {"epochs": 10, "protocols": ["paper", "final", "inner"], "inner_val_subjects": 2, "report_every": 1,
         "device": "auto"}


def space(trial):
    config = {"model": trial.suggest_categorical("model", ["htnet", "ststnet"]),
              "lr": trial.suggest_float("lr", 3.0e-4, 3.0e-2, log=True),
              "batch_size": trial.suggest_categorical("batch_size", [16, 32])}
    if config["model"] == "htnet":  # a one-level HTNet; heads divide dim (16 or 32), patches tile the 28x28 image
        config.update({"model_config.dim": trial.suggest_categorical("model_config.dim", [16, 32]),
                       "model_config.heads": trial.suggest_categorical("model_config.heads", [1, 2, 4]),
                       "model_config.patch_size": trial.suggest_categorical("model_config.patch_size", [7, 14]),
                       "model_config.num_hierarchies": 1, "model_config.block_repeats": [1]})
    return config
