"""benchmarks/pruning_efficiency.py: its replay of a recorded no-pruner arm must be the pruned arm a
real run gives, and its fold-epoch counts must charge a stopped trial for the whole fold group."""
import optuna
import pytest

from benchmarks.pruning_efficiency import replay_arm, run_arm, search_space, summary
from search.space import make_pruner

# 9 subjects; 4 members per group = 2 folds (inner + main run each) trained together
OVERRIDES = {"epochs": 1, "engine": "batched", "seed": 1, "fold_group_size": 4}


@pytest.fixture(scope="module")
def unpruned(synth_data):
    space = search_space()
    return run_arm(space, synth_data, optuna.pruners.NopPruner(), 5, OVERRIDES, 0, "no pruner")[0]


@pytest.mark.parametrize("pruner", [
    {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 1},
    {"type": "wilcoxon", "p_threshold": 0.7},   # per-fold objectives at step = fold number (0.7: one trial is pruned)
])
def test_replay_of_the_unpruned_arm_is_the_real_pruned_arm(synth_data, unpruned, pruner):
    space = search_space()
    pruned, _ = run_arm(space, synth_data, make_pruner(pruner, "test"), 5, OVERRIDES, 0, "pruner")
    replayed = replay_arm(make_pruner(pruner, "test"), unpruned, space.metric)

    assert all(r["status"] == "finished" and len(r["reports"]) == 9 for r in unpruned)
    assert any(r["status"] == "pruned" for r in pruned), "the test needs a pruned trial"
    for real, replay in zip(pruned, replayed):
        assert (real["status"], real["folds_done"], real["fold_epochs"]) == \
            (replay["status"], replay["folds_done"], replay["fold_epochs"])
        assert real[space.metric] == replay[space.metric]
    assert summary(pruned, space.metric) == summary(replayed, space.metric)

    # groups of 2 folds: the engine has trained 2, 2, 4, 4, ... folds' worth when folds 1, 2, 3, ... report
    by_step = unpruned[0]["trained_by_step"]
    per_fold = unpruned[0]["fold_epochs"] // 9
    assert [by_step[step] // per_fold for step in range(1, 10)] == [2, 2, 4, 4, 6, 6, 8, 8, 9]
    stopped = [r for r in pruned if r["status"] == "pruned"]
    assert all(r["trained_by_step"][r["folds_done"]] >= r["fold_epochs"] for r in stopped)
