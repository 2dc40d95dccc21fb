"""The search's progress on the console: one line per trial event, and a table of the running trials and the best
finished ones when there was news, after TABLE_EVERY_S seconds, then at doubling intervals up to TABLE_EVERY_MAX_S."""
import time

from ray import tune

from search.bridge import finite
from search.driver import console
from search.tracking.schema import run_name, trial_status
from search.tracking.writer import error_text

TABLE_EVERY_S, TABLE_EVERY_MAX_S = 60, 960
TABLE_BEST = 5  # finished trials in the table, beside the running ones


class SearchProgress(tune.Callback):
    def __init__(self, space, searcher, num_samples):
        self.space, self.searcher, self.num_samples = space, searcher, num_samples
        self._trials = {}  # Ray trial id -> {"tag", "label", "status", "step", "total", "value", "device"}
        self._storage_down = False  # a trial said its checkpoint could not be stored, none stored one since

    def setup(self, **info):
        self._start = self._table_at = time.monotonic()
        self._every, self._news = TABLE_EVERY_S, False

    def _say(self, text):
        seconds = int(time.monotonic() - self._start)
        print(f"[{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}] {text}", file=console.out(), flush=True)
        self._news = True

    def _trial(self, trial, status=None, result=None):
        """The trial's state, updated with its new `status` and `result`."""
        if trial.trial_id not in self._trials:
            sampled, number = self.space.sampled(trial.config), self.searcher.optuna_trial_number(trial.trial_id)
            self._trials[trial.trial_id] = {
                "tag": trial.trial_id if number is None else f"#{number:02d}", "status": "running",
                "label": run_name(self.space.resolve(sampled).get("model", "htnet"), sampled, 0).rsplit(" #", 1)[0],
                "step": 0, "total": None, "value": None, "device": None}
        state = self._trials[trial.trial_id]
        if result is not None:
            value = result.get(self.space.metric)
            state.update(step=result.get("step", state["step"]), total=result.get("folds_total", state["total"]),
                         value=value if finite(value) else state["value"])
        state["status"] = status or state["status"]
        return state

    def _shown(self, state, result):
        folds = f"{state['step']}/{state['total']} folds" if state["total"] else f"{state['step']} folds"
        value = "-" if state["value"] is None else f"{state['value']:.4f}"
        device = None if state["device"] else result.get("htnet_device")  # said once: does the trial see the GPU?
        state["device"] = state["device"] or device
        where = f" (on {', '.join(filter(None, (device, result.get('htnet_gpu'))))})" if device else ""
        return f"{folds}, {self.space.metric} {value}{where}"

    def on_trial_start(self, iteration, trials, trial, **info):
        state = self._trial(trial)
        again = state["status"] == "retrying" or trial.checkpoint is not None  # a retry, or a resumed search
        state["status"] = "running"
        self._say(f"trial {state['tag']} {'restarted' if again else 'started'}: {state['label']} "
                  f"(Ray trial {trial.trial_id})")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        state = self._trial(trial, result=result)
        if result.get("htnet_storage_error") and not self._storage_down:  # search.trainable._report
            self._storage_down = True
            self._say(f"warning: trial {state['tag']} could not store its checkpoint in Ray's storage "
                      f"({result['htnet_storage_error']}); the trials keep their finished folds and train on, "
                      f"and store them once the storage answers")
        elif self._storage_down and result.get("checkpoint_dir_name"):
            self._storage_down = False
            self._say(f"Ray's storage answers again: trial {state['tag']} stored its checkpoint")
        if not result.get("final") and not self.searcher.is_pruned(trial.trial_id):  # else its end line says it
            self._say(f"trial {state['tag']}: {self._shown(state, result)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        state = self._trial(trial, trial_status(result, self.searcher.is_pruned(trial.trial_id)), result)
        if state["status"] == "failed":
            self._say(f"trial {state['tag']} failed: {result.get('htnet_error', 'no result')}")
        elif state["status"] == "pruned":
            self._say(f"trial {state['tag']} pruned at {self._shown(state, result)} "
                      f"({self.space.pruner['type']} pruner)")
        else:
            self._say(f"trial {state['tag']} finished: {self._shown(state, result)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._say(f"trial {self._trial(trial, 'failed')['tag']} failed: {error_text(trial)}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        tag = self._trial(trial, "retrying")["tag"]
        self._say(f"trial {tag}'s worker failed ({error_text(trial)}); Ray retries it")

    def on_step_end(self, iteration, trials, **info):
        if self._news and time.monotonic() - self._table_at >= self._every:
            self._table_at, self._every = time.monotonic(), min(2 * self._every, TABLE_EVERY_MAX_S)
            self._say(self.table())
            self._news = False

    def table(self):
        states = list(self._trials.values())
        counts = [f"{sum(t['status'] == s for t in states)} {s}" for s in ("finished", "pruned", "failed")]
        running = [t for t in states if t["status"] in ("running", "retrying")]
        best = sorted((t for t in states if t["status"] == "finished" and t["value"] is not None),
                      key=lambda t: -t["value"])[:TABLE_BEST]
        rows = [("trial", "status", "folds", self.space.metric, "configuration")]
        rows += [(t["tag"], t["status"], f"{t['step']}/{t['total'] or '?'}",
                  "-" if t["value"] is None else f"{t['value']:.4f}", t["label"]) for t in running + best]
        return "\n".join([f"{', '.join(counts)}, {len(running)} running of {self.num_samples} trials",
                          *(f"  {tag:<9} {status:<9} {folds:>7}  {value:>13}  {label}"
                            for tag, status, folds, value, label in rows)])
