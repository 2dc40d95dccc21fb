"""The MLflow writes of a search: its parent run, the Ray Tune callback that logs every trial attempt live, and
`sync`, which replays through it from Ray's results (the source of truth) whatever MLflow lacks."""
import contextlib
import functools
import math
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, Metric, Param, RunTag
from ray import tune

from htnet.checkpoint import FOLDS_DIR
from htnet.errors import UserError, first_line
from search.space import flatten, trial_config
from search.tracking.schema import (DEVICE_TAGS, EXPERIMENT_NOTE, PARTIAL_PREFIX, RESOLVED_PARAMS, RUN_STATUS,
                                    STATUS_ORDER, TERMINAL, ranked, run_name, trial_status, trial_table)
from search.tracking.store import FINAL_ERROR_CODES, client_for, mlflow_errors, retry, short_reason

logger = logging.getLogger(__name__)


def log_params(client, run_id, params):
    """MLflow keeps 6000 characters of a value; None as YAML's null, so params read back as the config."""
    texts = ((str(k), "null" if v is None else str(v)) for k, v in params.items())
    retry(client.log_batch, run_id, params=[Param(k, v if len(v) <= 6000 else v[:5997] + "...") for k, v in texts])


def log_metrics(client, run_id, metrics, step=0):
    """The metrics that are finite numbers (None, text and booleans skipped)."""
    now = int(time.time() * 1000)
    retry(client.log_batch, run_id, metrics=[Metric(str(k), float(v), now, int(step)) for k, v in metrics.items()
                                             if isinstance(v, (int, float)) and not isinstance(v, bool)
                                             and math.isfinite(v)])


def set_tags(client, run_id, tags):
    retry(client.log_batch, run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])


def log_dataset(client, run_id, digest, root, synthetic=False):
    """The run's data as its MLflow dataset input (the runs table's Dataset column), digest: provenance's htnet_data."""
    name, source = ("synthetic", f"synthetic:{root}") if synthetic else (Path(root).name, str(root))
    retry(client.log_inputs, run_id, datasets=[DatasetInput(Dataset(name, str(digest), source_type="local",
                                                                    source=source))])


def start_parent_run(client, experiment_id, name, space, objective_metric, extra_params=None, tags=None,
                     dataset=None):
    tags = {"htnet.role": "search", "htnet.search": name, "htnet.objective": objective_metric,
            "htnet.objective_protocol": space.objective, "mlflow.runName": name, **(tags or {})}
    run_id = retry(client.create_run, experiment_id, tags=tags, run_name=name).info.run_id
    settings = ("num_samples", "max_concurrent_trials", "sampler", "pruner", "resources", "max_failures", "objective")
    log_params(client, run_id, {**{k: getattr(space, k) for k in settings}, "space_file": space.source,
                                **(extra_params or {})})
    retry(client.log_text, run_id, space.text, "space.py")
    if dataset:
        log_dataset(client, run_id, *dataset)
    # the experiment's description, unless someone wrote their own
    note = retry(client.get_experiment, experiment_id).tags.get("mlflow.note.content", "")
    if note != EXPERIMENT_NOTE and (not note or note.startswith(EXPERIMENT_NOTE.splitlines()[0])):
        retry(client.set_experiment_tag, experiment_id, "mlflow.note.content", EXPERIMENT_NOTE)
    return run_id


def finish_parent_run(client, parent_run_id, table, metric, status="FINISHED"):
    """Counts of every status (0 too: a resumed search's earlier counts must not stand), the best finished trial's
    objective and best_<protocol>_<dataset>_<uf1|uar>, and trials.csv."""
    counts = table["status"].value_counts()
    metrics = {f"trials_{k}": int(counts.get(k, 0)) for k in STATUS_ORDER}
    finished = table[table["status"] == "finished"]
    if metric in finished and finished[metric].notna().any():
        best = ranked(finished, metric).iloc[0]
        results = best.filter(regex=r"^metrics\..*_(uf1|uar)$")
        metrics.update({f"best_{k[len('metrics.'):]}": v for k, v in results.items()})
        metrics[f"best_{metric}"] = best[metric]
        set_tags(client, parent_run_id, {"htnet.best_trial_id": best["trial_id"], "htnet.best_run_id": best["run_id"]})
    log_metrics(client, parent_run_id, metrics)
    trials = table.drop(columns=table.filter(regex=r"^(metrics|params)\.").columns)
    retry(client.log_text, parent_run_id, trials.to_csv(index=False), "trials.csv")
    retry(client.set_terminated, parent_run_id, status)


def create_trial_run(client, experiment_id, parent_run_id, search_name, space, overrides, trial, attempt,
                     optuna_number=None, dataset=None):
    """The child run of one trial attempt: its tags, params (the flattened LOSO config it runs), config.yaml, data."""
    sampled = space.sampled(trial.config)
    try:
        config = trial_config(space, trial.config, overrides).to_dict()
    except UserError:  # the trial fails on it too (its run says why): the config as sampled
        config = space.resolve(sampled, overrides)
    resources = getattr(trial.placement_group_factory, "required_resources", {})
    tags = {"mlflow.parentRunId": parent_run_id, "htnet.role": "trial", "htnet.search": search_name,
            "htnet.trial_id": trial.trial_id, "htnet.attempt": attempt, "htnet.status": "running",
            "htnet.objective": space.metric, "htnet.objective_protocol": space.objective,
            "htnet.optuna_study": search_name, "htnet.optuna_trial": optuna_number, "htnet.sampled": ",".join(sampled),
            "htnet.resources": ",".join(f"{k.lower()}={v:g}" for k, v in sorted(resources.items())
                                        if k in ("CPU", "GPU"))}
    name = run_name(config.get("model", "htnet"), sampled, trial.trial_id if optuna_number is None else optuna_number)
    run_id = retry(client.create_run, experiment_id, tags={k: str(v) for k, v in tags.items() if v is not None},
                   run_name=name + (f" attempt {attempt}" if attempt > 1 else "")).info.run_id
    log_params(client, run_id, flatten(config))
    retry(client.log_dict, run_id, config, "config.yaml")
    if dataset:
        log_dataset(client, run_id, *dataset)
    return run_id


def log_trial_files(client, run_id, trial_id, checkpoint):
    """A finished trial's last Ray checkpoint as the run's artifacts. Returns None, or why Ray's storage or MLflow's
    artifact store could not (tagged on the run; the files stay in Ray's storage); raises if MLflow is gone."""
    try:
        with checkpoint.as_directory() as folder, tempfile.TemporaryDirectory() as files:
            # the fold records stay in the checkpoint only: a retry of a trial lost in its last report needs them
            shutil.copytree(folder, files, dirs_exist_ok=True, ignore=shutil.ignore_patterns(FOLDS_DIR))
            retry(client.log_artifacts, run_id, files, tries=2)
    except Exception as e:  # noqa: BLE001 - missing files must not end the search
        if isinstance(e, mlflow_errors()):
            client.get_run(run_id)   # raises if the server is gone, not only its artifact store
        logger.warning("could not log the artifacts of trial %s: %s", trial_id, e)
        set_tags(client, run_id, {"htnet.artifacts_error": short_reason(e)})
        return short_reason(e)
    return None


def error_text(trial):
    """The last line of the trial's error as Ray recorded it, or that its worker failed."""
    with contextlib.suppress(Exception):  # an experiment read back may lack its error file
        if lines := [line for line in str(trial.get_error() or "").strip().splitlines() if line.strip()]:
            return lines[-1][:5000]
    return "the trial's worker failed"


class MlflowTracking(tune.Callback):
    """The child run of every trial attempt, logged live from the driver (one writer). An event MLflow refuses is
    skipped (one warning, the first time); if the store stops answering, one warning and no more writes: Ray keeps
    the results for `sync`, which replays them through the same steps."""

    gone = None  # why the store stopped answering; None while it answers (and when unpickled)
    numbers = None  # `sync`: trial id -> Optuna trial number, where no searcher is live

    def __init__(self, tracking_uri, experiment_id, search_name, parent_run_id, space, searcher, overrides,
                 dataset=None):
        self.tracking_uri, self.experiment_id, self.search_name = tracking_uri, experiment_id, search_name
        self.parent_run_id, self.space, self.searcher = parent_run_id, space, searcher
        self.overrides, self.dataset = overrides, dataset  # dataset: log_dataset's arguments
        self._runs, self._attempts = {}, {}  # trial id -> the run id of the attempt in progress; -> attempts so far
        self._terminal, self._tagged = set(), set()  # trial ids whose run ended; whose device/node tags are set
        self._orphans_checked = self._refused = False

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("client", "gone")}

    @functools.cached_property
    def client(self):
        return client_for(self.tracking_uri)

    def _guard(self, what, fn, *args):
        """Run one MLflow step of a Ray event; MLflow's errors never stop the search."""
        if self.gone:
            return
        try:
            fn(*args)
        except mlflow_errors() as e:
            if getattr(e, "error_code", None) in FINAL_ERROR_CODES:  # one call refused, not the store gone
                logger.info("MLflow refused %s: %s", what, str(e).strip()[:300])
                if not self._refused:
                    self._refused = True
                    print(f"warning: MLflow refused {what} ({first_line(e)[:200]}): skipped; Ray keeps the "
                          f"results", file=sys.stderr, flush=True)
                return
            self.gone = short_reason(e)
            print(f"warning: MLflow at {self.tracking_uri} stopped answering ({self.gone}): the trials go on and "
                  f"Ray keeps their results for it", file=sys.stderr, flush=True)

    def setup(self, **info):
        self._guard("setup", self._load_existing)

    def _load_existing(self):
        """A resumed search: the runs of its trials so far, by attempt (the last is the highest); a run whose end
        status was logged but not its end is ended."""
        for row in trial_table(self.client, self.experiment_id, self.parent_run_id, latest=False).to_dict("records"):
            trial_id = row["trial_id"]
            self._attempts[trial_id] = row["attempt"]
            if row["status"] in ("running", "interrupted"):
                self._runs[trial_id] = row["run_id"]
            elif row["status"] in TERMINAL and not row["retried"]:
                self._terminal.add(trial_id)
                self._runs.pop(trial_id, None)
                if row["run_status"] == "RUNNING":
                    retry(self.client.set_terminated, row["run_id"], RUN_STATUS.get(row["status"], "FINISHED"))

    def on_step_begin(self, iteration, trials, **info):
        if not self._orphans_checked:
            self._orphans_checked = True
            self._guard("the check for lost trials", self._mark_lost, trials)

    def _mark_lost(self, trials):
        """Runs of trials that Ray lost with the killed driver (never in its snapshot)."""
        for trial_id in set(self._runs) - {t.trial_id for t in trials}:
            set_tags(self.client, self._runs[trial_id], {
                "htnet.status": "failed", "htnet.lost": "true",
                "htnet.error": "the driver died before Ray recorded this trial; its sample was drawn again"})
            retry(self.client.set_terminated, self._runs.pop(trial_id), "KILLED")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._guard("the start of trial " + trial.trial_id, self._start, trial)

    def _start(self, trial):
        trial_id = trial.trial_id
        if trial_id in self._terminal:
            return  # ended before the driver was killed: its run stays as it ended
        live = self.searcher is not None  # else `sync`
        if trial_id in self._runs:  # restarted by a resumed search (or filled in by `sync`): the same run goes on
            run = retry(self.client.get_run, self._runs[trial_id])
            retry(self.client.update_run, run.info.run_id, status="RUNNING")
            restarts = {"htnet.restarts": int(run.data.tags.get("htnet.restarts", 0)) + 1} if live else {}
            set_tags(self.client, run.info.run_id, {"htnet.status": "running", **restarts})
            if self.dataset and not run.inputs.dataset_inputs:  # MLflow stopped answering before it took its data
                log_dataset(self.client, run.info.run_id, *self.dataset)
            return
        self._attempts[trial_id] = attempt = self._attempts.get(trial_id, 0) + 1
        number = self.searcher.optuna_trial_number(trial_id) if live else self.numbers.get(trial_id)
        self._runs[trial_id] = run_id = create_trial_run(
            self.client, self.experiment_id, self.parent_run_id, self.search_name, self.space, self.overrides,
            trial, attempt, number, self.dataset)
        if live:
            self.searcher.set_ray_trial_attrs(trial_id, ray_trial_id=trial_id, mlflow_run_id=run_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.searcher.is_pruned(trial.trial_id):
            result["htnet_status"] = "pruned"  # shows in Ray Tune's table and results
        self._guard("a result of trial " + trial.trial_id, self._result, trial, result)

    def _result(self, trial, result):
        if (run_id := self._runs.get(trial.trial_id)) is None:
            return
        if trial.trial_id not in self._tagged and result.get("htnet_device"):
            self._tagged.add(trial.trial_id)
            set_tags(self.client, run_id, {tag: result.get(key, "") for tag, key in DEVICE_TAGS.items()})
            if params := {p: result[k] for p, k in RESOLVED_PARAMS.items() if result.get(k) is not None}:
                log_params(self.client, run_id, params)
        if result.get("step") is not None and result.get("htnet_status") != "failed":  # the curve, by folds done
            log_metrics(self.client, run_id, {f"running_{self.space.metric}": result.get(self.space.metric),
                                              "folds_done": result["step"]}, step=result["step"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._guard("the end of trial " + trial.trial_id, self._end, trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._guard("the retry of trial " + trial.trial_id, self._end, trial, True, {"htnet.retried": "true"})

    def on_trial_error(self, iteration, trials, trial, **info):
        self._guard("the error of trial " + trial.trial_id, self._end, trial, True)

    def _end(self, trial, failed=False, tags=None):
        """A trial's run ends: final metrics, a finished trial's files, the status (a pruned run's name says so too).
        failed: its worker or node died (tag htnet.retried: Ray retries it as a new run)."""
        trial_id, result, tags, client = trial.trial_id, trial.last_result or {}, tags or {}, self.client
        if (run_id := self._runs.pop(trial_id, None)) is None:
            return
        self._tagged.discard(trial_id)  # a retry is a new run: tag its device and node too
        pruned = self.searcher is not None and self.searcher.is_pruned(trial_id)
        status = "failed" if failed else trial_status(result, pruned)
        step, prefix = result.get("step", 0), "" if status == "finished" else PARTIAL_PREFIX  # plain: complete only
        counts = {k: v for k, v in result.items() if k.startswith(("fold_epochs", "wall_time_s"))}
        log_metrics(client, run_id, {**{prefix + k: v for k, v in result.items() if k.endswith(("_uf1", "_uar"))},
                                     **counts, "folds_done": step, "trial_wall_time_s": result.get("time_total_s")},
                    step=step)
        checkpoint = trial.checkpoint if status == "finished" else None
        if checkpoint is not None and (why := log_trial_files(client, run_id, trial_id, checkpoint)):
            print(f"warning: trial {trial_id}'s files could not be stored in MLflow ({why}; its run is tagged "
                  f"htnet.artifacts_error): they are kept in Ray's storage, {checkpoint.path}",
                  file=sys.stderr, flush=True)
        error = error_text(trial) if failed else str(result.get("htnet_error", ""))[:5000]
        why = {"failed": {"htnet.error": error}, "pruned": {"htnet.pruned_at_step": step}}
        set_tags(client, run_id, {"htnet.status": status, **why.get(status, {}), **tags})
        if status == "pruned" and not (name := retry(client.get_run, run_id).info.run_name).endswith(" (pruned)"):
            retry(client.update_run, run_id, name=f"{name} (pruned)")
        retry(client.set_terminated, run_id, RUN_STATUS.get(status, "FINISHED"))
        if "htnet.retried" not in tags:
            self._terminal.add(trial_id)


def sync(client, experiment_id, parent_run_id, search_name, space, analysis, overrides, optuna_numbers,
         dataset=None):
    """Log every ended trial of Ray's experiment (`analysis`: tune.ExperimentAnalysis) that MLflow lacks, nothing
    twice, through MlflowTracking's steps: into its open run or else a new one (attempt + 1), tagged
    htnet.backfilled; returns their trial ids. MLflow's errors are raised."""
    writer = MlflowTracking(None, experiment_id, search_name, parent_run_id, space, None, overrides, dataset)
    writer.client, writer.numbers = client, optuna_numbers
    writer._load_existing()
    ended = [t for t in analysis.trials if t.status in ("TERMINATED", "ERROR") and t.trial_id not in writer._terminal]
    for trial in ended:
        writer._start(trial)
        writer._result(trial, {k: v for k, v in (trial.last_result or {}).items() if k != "step"})  # device tags
        history = analysis.trial_dataframes.get(trial.trial_id)
        if history is not None and "step" in history:  # the curve; a step reported twice: its last report
            for row in history.drop_duplicates("step", keep="last").to_dict("records"):
                writer._result(trial, {k: v for k, v in row.items() if not (isinstance(v, float) and math.isnan(v))})
        failures = {"htnet.failures": trial.num_failures} if trial.num_failures else {}
        writer._end(trial, trial.status == "ERROR", {"htnet.backfilled": "true", **failures})
    return [t.trial_id for t in ended]


def mark_interrupted(client, experiment_id, parent_run_id):
    """A search stopped before its end (Ctrl+C): its open trial runs say so; a resumed search reopens them."""
    table = trial_table(client, experiment_id, parent_run_id, latest=False)
    for run_id in table["run_id"][table["run_status"] == "RUNNING"]:
        set_tags(client, run_id, {"htnet.status": "interrupted"})
        retry(client.set_terminated, run_id, "KILLED")
