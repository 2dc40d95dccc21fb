"""Successive halving that judges every trial by the same rule, whichever reached a rung first."""
import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState


class SuccessiveHalvingPruner(optuna.pruners.BasePruner):
    """Optuna's asynchronous successive halving (optuna.pruners.SuccessiveHalvingPruner: the same arguments, checks
    and promotion rule) on Optuna's public pruner interface, plus `rejudge`.

    Rung r ends at step min_resource * reduction_factor**(r + min_early_stopping_rate); a trial's value there is its
    first reported value at or after that step. A trial reaching a rung goes on if that value is in the top
    1/reduction_factor of the values of every trial that has reached the rung (the best while fewer than
    reduction_factor have); while no more than bootstrap_count trials have reached it, the trial is pruned (Optuna
    cannot pause a trial until enough have). min_resource="auto" is the longest completed trial's last step // 100
    (at least 1), fixed once a trial has completed; until then nothing is pruned.

    rejudge: at each report, the rungs a trial has passed are judged again against every trial that has reached
    them since. Without it the trial that reaches a rung first passes it unopposed: in the cpu-study (2 trials at a
    time) the faster of the first pair passed every rung with the study's lowest values and cost 27% of its
    fold-epochs.

    Optuna's stores a trial's value at a rung (a system attribute, which its public API cannot write) when it
    judges it; this one reads every trial's reported values. So a value reported with no prune call after it (a
    trial's last report, or a report before "auto" is fixed) competes here and not in Optuna's, and a second prune
    call at the same step judges that step's rungs again (Optuna's judges each rung once)."""

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
        if self.min_resource is None:
            completed = [t.last_step for t in trials if t.state == TrialState.COMPLETE and t.last_step is not None]
            self.min_resource = max(max(completed) // 100, 1) if completed else None
        if not steps or self.min_resource is None:
            return False
        judged_after = steps[-2] if len(steps) > 1 and not self.rejudge else -1  # the rungs this report reached
        others = [t for t in trials if t.number != trial.number]
        rung = 0
        while (end := self.min_resource * self.reduction_factor ** (rung + self.min_early_stopping_rate)) <= steps[-1]:
            rung += 1
            if end <= judged_after:
                continue
            value = value_at(trial, end)
            if value != value:  # NaN
                return True
            competing = [v for t in others if (v := value_at(t, end)) is not None and v == v] + [value]
            if len(competing) <= self.bootstrap_count or not promoted(value, competing, self.reduction_factor,
                                                                      study.direction):
                return True
        return False


def value_at(trial, end):
    """The trial's first reported value at or after step `end` (None if it has not reached it)."""
    step = min((s for s in trial.intermediate_values if s >= end), default=None)
    return None if step is None else trial.intermediate_values[step]


def promoted(value, competing, reduction_factor, direction):
    """Optuna's rule: in the top len // reduction_factor of `competing` (which holds `value`), or the best."""
    maximize = direction == StudyDirection.MAXIMIZE
    bar = sorted(competing, reverse=maximize)[max(len(competing) // reduction_factor, 1) - 1]
    return value >= bar if maximize else value <= bar
