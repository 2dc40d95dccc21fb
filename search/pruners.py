"""Successive halving that judges every trial by the same rule, whichever reached a rung first."""
import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState


class SuccessiveHalvingPruner(optuna.pruners.BasePruner):
    """Optuna's asynchronous successive halving (its arguments, checks and promotion rule) on the public BasePruner,
    plus `rejudge`: each report judges again the rungs the trial has passed, against every trial that reached them
    since (without it, in the cpu-study, the faster of the first pair passed every rung unopposed with the study's
    lowest values). A trial's value at a rung is its first reported value at or after the rung's step, read from the
    reported values (Optuna's pruner stores it when judging), so a last report, never judged, competes too."""

    def __init__(self, min_resource: str | int = "auto", reduction_factor: int = 4, min_early_stopping_rate: int = 0,
                 bootstrap_count: int = 0, rejudge: bool = False):
        optuna.pruners.SuccessiveHalvingPruner(min_resource, reduction_factor, min_early_stopping_rate,
                                               bootstrap_count)  # its checks: a bad value is its ValueError
        self.min_resource = None if min_resource == "auto" else min_resource
        self.reduction_factor, self.min_early_stopping_rate = reduction_factor, min_early_stopping_rate
        self.bootstrap_count, self.rejudge = bootstrap_count, rejudge

    def prune(self, study, trial):
        steps = sorted(trial.intermediate_values)
        trials = study.get_trials(deepcopy=False)
        if self.min_resource is None:  # "auto", as Optuna's: the first completed trial's last step // 100
            completed = [t.last_step for t in trials if t.state == TrialState.COMPLETE and t.last_step is not None]
            self.min_resource = max(max(completed) // 100, 1) if completed else None
        if not steps or self.min_resource is None:
            return False
        judged_after = steps[-2] if len(steps) > 1 and not self.rejudge else -1  # the rungs this report reached
        others = [t for t in trials if t.number != trial.number]
        maximize, rung = study.direction == StudyDirection.MAXIMIZE, 0
        while (end := self.min_resource * self.reduction_factor ** (rung + self.min_early_stopping_rate)) <= steps[-1]:
            rung += 1
            if end <= judged_after:
                continue
            value = value_at(trial, end)
            if value != value:  # NaN
                return True
            competing = [v for t in others if (v := value_at(t, end)) is not None and v == v] + [value]
            # Optuna's rule: promoted if in the top len // reduction_factor (or the best), once past bootstrap_count
            bar = sorted(competing, reverse=maximize)[max(len(competing) // self.reduction_factor, 1) - 1]
            if len(competing) <= self.bootstrap_count or (value < bar if maximize else value > bar):
                return True
        return False


def value_at(trial, end):
    """The trial's first reported value at or after step `end` (None if it has not reached it)."""
    step = min((s for s in trial.intermediate_values if s >= end), default=None)
    return None if step is None else trial.intermediate_values[step]

