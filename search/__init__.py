"""Distributed hyper-parameter search over full LOSO runs: Ray Tune trials, Optuna sampling and
pruning, MLflow tracking. `python -m search --help`; the design is in docs/design.md."""
