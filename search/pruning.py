"""The Ray side of the bridge (protocol: search.bridge): a Ray Tune searcher over Optuna's ask/tell API, whose
study's pruner stops Ray Tune trials (OptunaPruningScheduler)."""
import logging
import pickle

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from search.bridge import finite, report, tell

logger = logging.getLogger(__name__)


class PruningOptunaSearch(Searcher):
    """One Optuna trial per Ray Tune trial (user attribute `ray_trial_id`), sampled by `space(trial) -> config`."""

    def __init__(self, space, metric, mode="max", pruner=None, sampler=None, study_name=None, storage=None):
        super().__init__(metric=metric, mode=mode)
        self.space = space
        self.study = optuna.create_study(storage=storage, sampler=sampler, pruner=pruner or optuna.pruners.NopPruner(),
                                         study_name=study_name, load_if_exists=True,
                                         direction="maximize" if mode == "max" else "minimize")
        self.trials, self.pruned, self.ended = {}, set(), set()  # Ray trial id -> Optuna Trial; Ray trial ids

    def suggest(self, trial_id):
        if trial_id not in self.trials:
            self.trials[trial_id] = self.study.ask()
        trial = self.trials[trial_id]
        trial.set_user_attr("ray_trial_id", trial_id)
        return self.space(trial)

    def optuna_trial_number(self, trial_id):
        return getattr(self.trials.get(trial_id), "number", None)

    def is_pruned(self, trial_id):
        return trial_id in self.pruned

    def stored(self, trial):
        """The trial as stored: a killed driver may have told it already (numbers are consecutive from 0)."""
        return self.study.get_trials(deepcopy=False)[trial.number]

    def report_and_should_prune(self, trial_id, result):
        """Report each result once (a restarted trial repeats its steps); True where the pruner prunes."""
        trial, value, step = self.trials.get(trial_id), result.get(self.metric), result.get("step")
        if trial is None or trial_id in self.ended or not finite(value) or step is None:
            return False  # a failed trial reports no objective
        stored = self.stored(trial)
        if stored.state != TrialState.RUNNING:  # told by a killed driver: one it had pruned stops again
            if stored.state == TrialState.PRUNED:
                self.pruned.add(trial_id)
            return stored.state == TrialState.PRUNED
        if not report(trial, self.study.pruner, step, value, result.get("fold_objectives") or [],
                      bool(result.get("final")), stored.intermediate_values):
            return False
        self.pruned.add(trial_id)
        trial.set_user_attr("pruned_at_step", int(step))
        logger.info("Optuna pruned trial %s (Optuna trial %d) at step %s: %s = %.4f",
                    trial_id, trial.number, step, self.metric, value)
        return True

    def on_trial_complete(self, trial_id, result=None, error=False):
        trial, result = self.trials.get(trial_id), result or {}
        if trial is None or trial_id in self.ended:
            return
        self.ended.add(trial_id)
        if self.stored(trial).state != TrialState.RUNNING:  # told before the driver was killed
            return
        if result.get("htnet_status") == "failed" and result.get("htnet_error"):
            trial.set_user_attr("error", str(result["htnet_error"])[:500])
        tell(self.study, trial, result.get(self.metric), pruned=trial_id in self.pruned,
             failed=error or not result or result.get("htnet_status") == "failed")

    def set_ray_trial_attrs(self, trial_id, **attrs):
        trial = self.trials.get(trial_id)
        if trial is not None and self.stored(trial).state == TrialState.RUNNING:
            for key, value in attrs.items():
                trial.set_user_attr(key, value)

    # Only study.ask() makes a Trial that can report, so the state keeps the Trials, as Ray's OptunaSearch does; one
    # pickle keeps them one study (its RDB storage reconnects when unpickled).
    def save(self, checkpoint_path):
        with open(checkpoint_path, "wb") as file:
            pickle.dump({"study": self.study, "trials": self.trials, "pruned": self.pruned, "ended": self.ended}, file)

    def restore(self, checkpoint_path):
        """Trials a killed driver left RUNNING that no Ray trial owns are told FAIL and queued again: no sample lost."""
        with open(checkpoint_path, "rb") as file:
            state = pickle.load(file)
        self.study, self.trials, self.pruned, self.ended = (state[k] for k in ("study", "trials", "pruned", "ended"))
        owned = {t.number for t in self.trials.values()}
        for stored in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if stored.number not in owned:
                tell(self.study, stored.number, None, failed=True)
                self.study.enqueue_trial(stored.params, user_attrs={"requeued_from": stored.number})
                logger.warning("Optuna trial %d had no Ray trial after resume: told FAIL, its parameters queued again",
                               stored.number)


class OptunaPruningScheduler(FIFOScheduler):
    """FIFO scheduling; each result goes to the Optuna pruner, which may stop the trial."""

    def __init__(self, searcher):
        super().__init__()
        self.searcher = searcher

    def on_trial_result(self, tune_controller, trial, result):
        stop = self.searcher.report_and_should_prune(trial.trial_id, result)
        return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE
