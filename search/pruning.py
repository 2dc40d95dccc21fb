"""The Ray side of the bridge (protocol: search.bridge): the space's Optuna pruner decides which Ray Tune trials
stop, and Optuna is told PRUNED, FAIL or COMPLETE (Ray's OptunaSearch uses NopPruner and never asks)."""
import logging

from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from search.bridge import finite, report, tell

logger = logging.getLogger(__name__)


class PruningOptunaSearch(OptunaSearch):
    """OptunaSearch whose study has a real pruner and which tells Optuna PRUNED/FAIL/COMPLETE."""

    def __init__(self, pruner, **kwargs):
        self._pruner, self._pruned = pruner, set()
        super().__init__(**kwargs)  # OptunaSearch's: space, metric, mode, sampler, study_name, storage

    def _setup_study(self, mode):
        super()._setup_study(mode)
        self._ot_study.pruner = self._pruner  # should_prune() asks study.pruner

    def optuna_trial_number(self, trial_id):
        trial = self._ot_trials.get(trial_id)
        return None if trial is None else trial.number

    def is_pruned(self, trial_id):
        return trial_id in self._pruned

    def _frozen(self, ot_trial):
        return self._ot_study._storage.get_trial(ot_trial._trial_id)

    def report_and_should_prune(self, trial_id, result):
        """Every result, from OptunaPruningScheduler: report it once (a restarted trial repeats its steps) and
        let the pruner decide; a final result (a replayed one too) is reported, never pruned."""
        ot_trial = self._ot_trials.get(trial_id)
        value, step = result.get(self.metric), result.get("step")
        if ot_trial is None or trial_id in self._completed_trials or not finite(value) or step is None:
            return False  # a failed trial reports no objective
        frozen = self._frozen(ot_trial)
        folds = result.get("fold_objectives") or []
        if frozen.state.is_finished() or not report(ot_trial, self._pruner, step, value, folds,
                                                    bool(result.get("final")), frozen.intermediate_values):
            return False
        self._pruned.add(trial_id)
        ot_trial.set_user_attr("pruned_at_step", int(step))
        logger.info("Optuna pruned trial %s (Optuna trial %d) at step %s: %s = %.4f",
                    trial_id, ot_trial.number, step, self.metric, value)
        return True

    def on_trial_result(self, trial_id, result):
        pass  # reported by the scheduler, which sees every result first

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial, result = self._ot_trials[trial_id], result or {}
        self._completed_trials.add(trial_id)
        if self._frozen(ot_trial).state.is_finished():  # told before the driver was killed
            return
        if result.get("htnet_status") == "failed" and result.get("htnet_error"):
            ot_trial.set_user_attr("error", str(result["htnet_error"])[:500])
        tell(self._ot_study, ot_trial, result.get(self.metric), pruned=trial_id in self._pruned,
             failed=error or not result or result.get("htnet_status") == "failed")

    def set_ray_trial_attrs(self, trial_id, **attrs):
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and not self._frozen(ot_trial).state.is_finished():
            for key, value in attrs.items():
                ot_trial.set_user_attr(key, value)

    def restore(self, checkpoint_path):
        """Also: Optuna trials left RUNNING by a killed driver that no restored Ray trial owns are told FAIL, and
        their configuration asked again, so the driver's death loses no sample."""
        from optuna.trial import TrialState

        super().restore(checkpoint_path)
        owned = {t.number for t in self._ot_trials.values()}
        for frozen in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen.number not in owned:
                self._ot_study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
                self._ot_study.enqueue_trial(frozen.params, user_attrs={"requeued_from": frozen.number})
                logger.warning("Optuna trial %d had no Ray trial after resume: told FAIL, its "
                               "parameters queued again", frozen.number)


class OptunaPruningScheduler(FIFOScheduler):
    """FIFO scheduling; each result goes to the Optuna pruner, which may stop the trial."""

    def __init__(self, searcher):
        super().__init__()
        self.searcher = searcher

    def on_trial_result(self, tune_controller, trial, result):
        stop = self.searcher.report_and_should_prune(trial.trial_id, result)
        return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE

    def debug_string(self):
        return f"Using Optuna pruning ({type(self.searcher._pruner).__name__})."
