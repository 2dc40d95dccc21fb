"""search.pruners.SuccessiveHalvingPruner: Optuna's successive halving on its public pruner interface. It prunes
what Optuna's own pruner prunes (each report followed by a prune call, as search.bridge reports), and with
`rejudge` it prunes a trial that passed a rung unopposed once better trials reach that rung."""
import random

import optuna
import pytest

from search.pruners import SuccessiveHalvingPruner

optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_side_by_side(options, direction, seed, trials=24, steps=20, concurrent=3):
    """The same trials, reported asynchronously (a few at a time, in a random order), to one study with Optuna's
    pruner and one with ours; a trial stops where Optuna's prunes it. The two pruners' decisions, in order."""
    rng = random.Random(seed)
    theirs = optuna.create_study(direction=direction, pruner=optuna.pruners.SuccessiveHalvingPruner(**options))
    ours = optuna.create_study(direction=direction, pruner=SuccessiveHalvingPruner(**options))
    quality = [rng.random() for _ in range(trials)]
    running, waiting, decisions = {}, list(range(trials)), []
    while running or waiting:
        while waiting and len(running) < concurrent:
            number = waiting.pop(0)
            running[number] = (theirs.ask(), ours.ask(), [0])
        number = rng.choice(sorted(running))
        their_trial, our_trial, step = running[number]
        step[0] += 1
        value = quality[number] * step[0] + rng.gauss(0, 0.5)
        their_trial.report(value, step[0])
        our_trial.report(value, step[0])
        decision = (number, step[0], their_trial.should_prune(), our_trial.should_prune())
        decisions.append(decision)
        if decision[2] or step[0] == steps:
            state = optuna.trial.TrialState.PRUNED if decision[2] else optuna.trial.TrialState.COMPLETE
            theirs.tell(their_trial, None if decision[2] else value, state=state)
            ours.tell(our_trial, None if decision[2] else value, state=state)
            del running[number]
    return decisions


@pytest.mark.parametrize("options, direction", [
    ({"min_resource": 1, "reduction_factor": 2}, "maximize"),
    ({"min_resource": 1, "reduction_factor": 4}, "minimize"),
    ({"min_resource": 2, "reduction_factor": 3, "min_early_stopping_rate": 1}, "maximize"),
    ({"min_resource": 1, "reduction_factor": 2, "bootstrap_count": 2}, "maximize"),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_prunes_what_optunas_own_pruner_prunes(options, direction, seed):
    decisions = run_side_by_side(options, direction, seed)
    assert sum(theirs for _, _, theirs, _ in decisions) >= 3, "the test needs trials that Optuna prunes"
    assert [(n, s, ours) for n, s, _, ours in decisions] == [(n, s, theirs) for n, s, theirs, _ in decisions]


def report(study, trial, value, step):
    trial.report(value, step)
    return trial.should_prune()


@pytest.mark.parametrize("rejudge", [False, True])
def test_rejudge_prunes_a_trial_that_passed_a_rung_unopposed(rejudge):
    """Rungs end at steps 1, 2, 4: the fast first trial passes 1 and 2 alone with the study's lowest values."""
    study = optuna.create_study(direction="maximize", pruner=SuccessiveHalvingPruner(
        min_resource=1, reduction_factor=2, rejudge=rejudge))
    fast = study.ask()
    assert not any(report(study, fast, 0.1, step) for step in (1, 2, 3))
    for value in (0.5, 0.6, 0.7):   # better trials reach rung 0: the top half of 0.1, 0.5, 0.6, 0.7 is 0.6 and up
        report(study, study.ask(), value, 1)
    assert report(study, fast, 0.1, 4) is rejudge   # rung 2 it reaches alone; rung 0 again only with rejudge


def test_auto_min_resource_waits_for_a_completed_trial():
    """Like Optuna's: nothing is pruned before a trial completes; then rungs end at its last step // 100."""
    study = optuna.create_study(direction="maximize", pruner=SuccessiveHalvingPruner(reduction_factor=2))
    first = study.ask()
    assert not any(report(study, first, 1.0, step) for step in range(1, 301))
    study.tell(first, 1.0)
    worse = study.ask()
    assert not report(study, worse, 0.0, 1) and not report(study, worse, 0.0, 2)  # rung 0 ends at step 3
    assert report(study, worse, 0.0, 3)


def test_bad_arguments_are_optunas_errors():
    with pytest.raises(ValueError, match="reduction_factor"):
        SuccessiveHalvingPruner(reduction_factor=1)
    with pytest.raises(ValueError, match="bootstrap_count"):
        SuccessiveHalvingPruner(bootstrap_count=2)   # with min_resource="auto"
