"""Optuna samples and prunes, Ray Tune runs: the bridge between them.

Ray Tune's `OptunaSearch` asks Optuna for configurations and tells it results, but it creates its
study with `NopPruner` and never asks a pruner; Ray's own schedulers (ASHA, ...) decide without
Optuna. Here the decision comes from the Optuna pruner itself, in three small pieces that all
live in the search driver:

1. `PruningOptunaSearch` (an `OptunaSearch`) creates the study with the pruner of the search
   space (MedianPruner by default) in persistent storage (sqlite or journal file), so
   `optuna.Trial.should_prune()` consults that pruner against the other trials of the study.
2. `OptunaPruningScheduler` (a `FIFOScheduler`) sees every intermediate result first: Ray calls
   the scheduler's `on_trial_result` before the searcher's. It hands the result to the searcher,
   which reports the objective to the trial's Optuna trial at step = LOSO folds done
   (`trial.report(value, step)`; a Wilcoxon pruner gets each fold's own objective at step = its
   fold number instead, see `search.space.pruner_steps`) and asks `trial.should_prune()`. True: the scheduler returns
   `TrialScheduler.STOP` and Ray stops the trial (Ray Tune status TERMINATED; the trial's last
   result gets `htnet_status: pruned` from the tracking callback).
3. When Ray completes the stopped trial, `PruningOptunaSearch.on_trial_complete` tells Optuna
   `TrialState.PRUNED` (plain OptunaSearch would tell COMPLETE, since the stopped trial has a
   metric). A trial that reports `htnet_status: failed` (diverged, impossible config) or errors is
   told FAIL; a finished one COMPLETE with its final objective.

The pruner only sees intermediate results (`final` results are never pruned) and every report of
a step is made once (a restarted trial does not report its steps twice). On resume the searcher
state (Ray trial id -> Optuna trial) comes back from Ray's experiment checkpoint; Optuna trials
left RUNNING by a killed driver that no restored Ray trial owns are told FAIL.
"""
import logging
import math

from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from search.space import pruner_steps

logger = logging.getLogger(__name__)

STEP_KEY = "step"
FINAL_KEY = "final"
STATUS_KEY = "htnet_status"
FOLDS_KEY = "fold_objectives"  # [[fold number, its own objective], ...], for pruners that pair folds


def _finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch whose study has a real pruner and which tells Optuna PRUNED/FAIL/COMPLETE."""

    def __init__(self, space, metric, mode, pruner, sampler, study_name, storage, **kwargs):
        self._pruner = pruner
        self._pruned = set()
        self._reported = {}
        super().__init__(space=space, metric=metric, mode=mode, sampler=sampler,
                         study_name=study_name, storage=storage, **kwargs)

    def _setup_study(self, mode):
        super()._setup_study(mode)
        # OptunaSearch creates the study with NopPruner; should_prune() asks study.pruner.
        self._ot_study.pruner = self._pruner

    @property
    def study(self):
        return self._ot_study

    def optuna_trial_number(self, trial_id):
        trial = self._ot_trials.get(trial_id)
        return None if trial is None else trial.number

    def is_pruned(self, trial_id):
        return trial_id in self._pruned

    def _frozen(self, ot_trial):
        return self._ot_study._storage.get_trial(ot_trial._trial_id)

    def _report(self, trial_id, result):
        """Report the objective at this step once; False where there is nothing to report."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return None
        value, step = result.get(self.metric), result.get(STEP_KEY)
        if not _finite(value) or step is None:
            return None
        step = int(step)
        if self._reported.get(trial_id, -1) >= step:
            return ot_trial
        frozen = self._frozen(ot_trial)
        if frozen.state.is_finished():
            return None
        for at, reported in pruner_steps(self._pruner, step, value, result.get(FOLDS_KEY) or []):
            if at not in frozen.intermediate_values:
                ot_trial.report(reported, at)
        self._reported[trial_id] = step
        return ot_trial

    def report_and_should_prune(self, trial_id, result):
        """Called by OptunaPruningScheduler with every result: the Optuna pruner decides."""
        if result.get(FINAL_KEY) or result.get(STATUS_KEY) in ("failed", "replayed"):
            return False
        ot_trial = self._report(trial_id, result)
        if ot_trial is None:
            return False
        if ot_trial.should_prune():
            self._pruned.add(trial_id)
            ot_trial.set_user_attr("pruned_at_step", int(result[STEP_KEY]))
            logger.info("Optuna pruned trial %s (Optuna trial %d) at step %s: %s = %.4f",
                        trial_id, ot_trial.number, result[STEP_KEY], self.metric, result[self.metric])
            return True
        return False

    def on_trial_result(self, trial_id, result):
        # Reported already by the scheduler; this covers results it did not see.
        self._report(trial_id, result)

    def on_trial_complete(self, trial_id, result=None, error=False):
        from optuna.trial import TrialState

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        self._completed_trials.add(trial_id)
        if self._frozen(ot_trial).state.is_finished():  # told before the driver was killed
            return
        value = (result or {}).get(self.metric)
        if trial_id in self._pruned:
            state, values = TrialState.PRUNED, None
        elif error or not result or result.get(STATUS_KEY) == "failed" or not _finite(value):
            state, values = TrialState.FAIL, None
        else:
            state, values = TrialState.COMPLETE, float(value)
        if result and result.get(STATUS_KEY) == "failed" and result.get("htnet_error"):
            ot_trial.set_user_attr("error", str(result["htnet_error"])[:500])
        try:
            self._ot_study.tell(ot_trial, values, state=state, skip_if_finished=True)
        except RuntimeError as e:
            # GridSampler calls study.stop() once the grid is done, which Optuna only allows
            # inside study.optimize(); the trial's state is stored before that.
            if "Study.stop" not in str(e):
                raise

    def set_ray_trial_attrs(self, trial_id, **attrs):
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and not self._frozen(ot_trial).state.is_finished():
            for key, value in attrs.items():
                ot_trial.set_user_attr(key, value)

    def restore(self, checkpoint_path):
        super().restore(checkpoint_path)
        self.fail_orphans()

    def fail_orphans(self):
        """Optuna trials left RUNNING by a killed driver that no restored Ray trial owns."""
        from optuna.trial import TrialState

        owned = {t.number for t in self._ot_trials.values()}
        for frozen in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen.number not in owned:
                self._ot_study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
                # The same configuration is asked again, so the driver's death loses no sample.
                self._ot_study.enqueue_trial(frozen.params, user_attrs={"requeued_from": frozen.number})
                logger.warning("Optuna trial %d had no Ray trial after resume: told FAIL, its "
                               "parameters queued again", frozen.number)

    def __getstate__(self):
        return self.__dict__.copy()


class OptunaPruningScheduler(FIFOScheduler):
    """FIFO scheduling; each result goes to the Optuna pruner, which may stop the trial."""

    def __init__(self, searcher):
        super().__init__()
        self.searcher = searcher

    def on_trial_result(self, tune_controller, trial, result):
        if self.searcher.report_and_should_prune(trial.trial_id, result):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self):
        return f"Using Optuna pruning ({type(self.searcher._pruner).__name__})."
