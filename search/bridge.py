"""The one report -> prune -> tell protocol between a LOSO run and its Optuna trial: for the Ray Tune search
(search.pruning), nested LOSO and benchmarks/pruning_efficiency.py."""
import math
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from htnet.errors import TrainingDiverged, UserError
from htnet.loso import run_loso
from search.space import trial_config


def finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fold_objectives(progress, metric):
    """[[fold number, that fold's own objective], ...] for the folds an engine report adds."""
    return [[f["fold"], float(f[metric])] for f in progress.get("folds", []) if finite(f.get(metric))]


def pairs_folds(pruner):  # Wilcoxon tests a trial fold by fold (the same subjects) against the best trial
    return isinstance(pruner, optuna.pruners.WilcoxonPruner)


def report(trial, pruner, step, value, folds=(), last=False, reported=()):
    """Report the pooled objective at step = folds done (Wilcoxon: each fold's own at its fold number, but the steps
    in `reported`); True where the pruner prunes, never on the last report."""
    pairs = [(int(f), float(v)) for f, v in folds] if pairs_folds(pruner) else [(int(step), float(value))]
    for at, reported_value in pairs:
        if at not in reported:
            trial.report(reported_value, at)
    return not last and trial.should_prune()


def tell(study, trial, value, pruned=False, failed=False):
    """End the trial (a Trial or its number) PRUNED, FAIL (failed, or no finite objective) or COMPLETE; the state."""
    state = TrialState.PRUNED if pruned else TrialState.FAIL if failed or not finite(value) else TrialState.COMPLETE
    try:
        study.tell(trial, float(value) if state == TrialState.COMPLETE else None, state=state, skip_if_finished=True)
    except RuntimeError as e:
        # GridSampler calls study.stop() once the grid is done (allowed only inside study.optimize): stored already
        if "Study.stop" not in str(e):
            raise
    return state


STATUS = {"PRUNED": "pruned", "FAIL": "failed", "COMPLETE": "finished"}


@dataclass
class TrialRun:  # one trial of run_trial
    trial: object                     # the Optuna trial
    status: str = "failed"            # finished | pruned | failed
    sampled: dict = field(default_factory=dict)
    config: object = None             # the LosoConfig
    result: object = None             # the LosoResult
    error: Exception | None = None
    reports: list = field(default_factory=list)  # [step, objective, fold-epochs, fold objectives] each


def run_trial(study, space, data, overrides=None):
    """One trial without Ray: ask, sample, run LOSO with a report after every engine report, tell how it ended."""
    run, metric = TrialRun(study.ask()), space.metric

    def callback(progress):
        value, step = progress.get(metric), progress["step"]
        if not finite(value):
            return None
        folds = fold_objectives(progress, metric)
        run.reports.append([step, float(value), progress["fold_epochs"], folds])
        return report(run.trial, study.pruner, step, value, folds, last=step >= progress["folds_total"])

    try:
        run.sampled = space.sample(run.trial)
        run.config = trial_config(space, run.sampled, overrides)
        run.result = run_loso(run.config, data, callback=callback, progress=False)
    except (TrainingDiverged, UserError) as e:
        run.error = e
    value = run.result.metrics.get(metric) if run.result else None
    run.status = STATUS[tell(study, run.trial, value, pruned=bool(run.result and run.result.stopped)).name]
    return run
