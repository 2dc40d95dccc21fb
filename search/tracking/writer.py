"""The MLflow writes of a search: its parent run, the Ray Tune callback that logs every trial attempt live, and
`sync`, which logs from Ray's results (the source of truth) whatever MLflow lacks."""
import functools
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
from search.tracking.schema import (EXPERIMENT_NOTE, STATUS_ORDER, TERMINAL, curve_of, device_tags, end_metrics,
                                    is_number, ranked, resolved_params, run_name, run_status, trial_status,
                                    trial_table)
from search.tracking.store import FINAL_ERROR_CODES, client_for, mlflow_errors, retry, short_reason

logger = logging.getLogger(__name__)


def log_params(client, run_id, params):
    """MLflow keeps 6000 characters of a value; None as YAML's null, so params read back as the config."""
    texts = ((str(k), "null" if v is None else str(v)) for k, v in params.items())
    retry(client.log_batch, run_id, params=[Param(k, v if len(v) <= 6000 else v[:5997] + "...") for k, v in texts])


def log_metrics(client, run_id, metrics, step=0):
    now = int(time.time() * 1000)
    retry(client.log_batch, run_id, metrics=[Metric(str(k), float(v), now, int(step))
                                             for k, v in metrics.items() if is_number(v)])


def set_tags(client, run_id, tags):
    retry(client.log_batch, run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])


def log_dataset(client, run_id, digest, root, synthetic=False):
    """The run's data as its MLflow dataset input (the runs table's Dataset column): the release folder or the
    synthetic set, with the data fingerprint (provenance's htnet_data) as its digest."""
    name, source = ("synthetic", f"synthetic:{root}") if synthetic else (Path(root).name, str(root))
    dataset = Dataset(name=name, digest=str(digest), source_type="local", source=source)
    retry(client.log_inputs, run_id, datasets=[DatasetInput(dataset)])


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


def log_trial_end(client, run_id, trial_id, result, status, checkpoint=None, wall_time_s=None, tags=None):
    """Final metrics, a finished trial's files, the end status (a pruned run's name says so too). Returns why the
    files could not be stored (log_trial_files), or None."""
    log_metrics(client, run_id, {**end_metrics(result, status), "trial_wall_time_s": wall_time_s},
                step=result.get("step", 0))  # log_metrics skips a None
    if params := resolved_params(result):
        log_params(client, run_id, params)
    unstored = None
    if status == "finished" and checkpoint is not None:
        unstored = log_trial_files(client, run_id, trial_id, checkpoint)
    why = {"failed": {"htnet.error": str(result.get("htnet_error", ""))[:5000]},
           "pruned": {"htnet.pruned_at_step": result.get("step", "")}}.get(status, {})
    set_tags(client, run_id, {"htnet.status": status, **why, **(tags or {})})
    if status == "pruned" and not (name := retry(client.get_run, run_id).info.run_name).endswith(" (pruned)"):
        retry(client.update_run, run_id, name=f"{name} (pruned)")
    retry(client.set_terminated, run_id, run_status(status))
    return unstored


def error_text(trial):
    try:
        lines = str(trial.get_error() or "the trial's worker failed").strip().splitlines()
    except Exception:  # noqa: BLE001
        lines = ["the trial's worker failed"]
    return ([line for line in lines if line.strip()] or [""])[-1][:5000]


class MlflowTracking(tune.Callback):
    """The child run of every trial attempt, logged live from the driver (one writer). An event MLflow refuses is
    skipped (one warning, the first time); if the store stops answering, one warning and no more writes: Ray keeps
    the results for `sync`."""

    gone = None  # why the store stopped answering; None while it answers (and when unpickled)

    def __init__(self, tracking_uri, experiment_id, search_name, parent_run_id, space, searcher, overrides,
                 dataset=None):
        self.tracking_uri, self.experiment_id, self.search_name = tracking_uri, experiment_id, search_name
        self.parent_run_id, self.space, self.searcher = parent_run_id, space, searcher
        self.overrides, self.dataset = overrides, dataset  # dataset: log_dataset's arguments
        # trial id -> the run id of the attempt in progress; -> attempts so far; -> time.time() of the attempt's start
        self._runs, self._attempts, self._started = {}, {}, {}
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
        """A resumed search: the runs of its trials so far, by attempt (the last is the highest)."""
        for row in trial_table(self.client, self.experiment_id, self.parent_run_id, latest=False).to_dict("records"):
            trial_id = row["trial_id"]
            self._attempts[trial_id] = row["attempt"]
            if row["status"] in ("running", "interrupted"):
                self._runs[trial_id] = row["run_id"]
            elif row["status"] in TERMINAL and not row["retried"]:
                self._terminal.add(trial_id)
                self._runs.pop(trial_id, None)

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
        self._started[trial.trial_id] = time.time()
        self._guard("the start of trial " + trial.trial_id, self._start, trial)

    def _start(self, trial):
        trial_id = trial.trial_id
        if trial_id in self._terminal:
            return  # ended before the driver was killed: its run stays as it ended
        if trial_id in self._runs:  # restarted by a resumed search: the same run goes on
            run = retry(self.client.get_run, self._runs[trial_id])
            retry(self.client.update_run, run.info.run_id, status="RUNNING")
            set_tags(self.client, run.info.run_id, {"htnet.status": "running",
                                                    "htnet.restarts": int(run.data.tags.get("htnet.restarts", 0)) + 1})
            return
        self._attempts[trial_id] = attempt = self._attempts.get(trial_id, 0) + 1
        self._runs[trial_id] = run_id = create_trial_run(
            self.client, self.experiment_id, self.parent_run_id, self.search_name, self.space, self.overrides,
            trial, attempt, self.searcher.optuna_trial_number(trial_id), self.dataset)
        self.searcher.set_ray_trial_attrs(trial_id, ray_trial_id=trial_id, mlflow_run_id=run_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.searcher.is_pruned(trial.trial_id):
            result["htnet_status"] = "pruned"  # shows in Ray Tune's table and results
        self._guard("a result of trial " + trial.trial_id, self._result, trial, result)

    def _result(self, trial, result):
        if (run_id := self._runs.get(trial.trial_id)) is None:
            return
        if trial.trial_id not in self._tagged and device_tags(result):
            self._tagged.add(trial.trial_id)
            set_tags(self.client, run_id, device_tags(result))
            if params := resolved_params(result):
                log_params(self.client, run_id, params)
        if result.get("step") is not None and result.get("htnet_status") != "failed":
            log_metrics(self.client, run_id, curve_of(result, self.space.metric), step=result["step"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._guard("the end of trial " + trial.trial_id, self._end, trial, None)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._guard("the retry of trial " + trial.trial_id, self._end, trial, {"htnet.retried": "true"})

    def on_trial_error(self, iteration, trials, trial, **info):
        self._guard("the error of trial " + trial.trial_id, self._end, trial, {})

    def _end(self, trial, failed_tags):
        """A trial's run ends: complete (failed_tags None), failed, or failed and retried by Ray as a new run."""
        trial_id = trial.trial_id
        if (run_id := self._runs.pop(trial_id, None)) is None:
            return
        self._tagged.discard(trial_id)  # a retry is a new run: tag its device and node too
        if failed_tags is None:
            result = trial.last_result or {}
            status = trial_status(result, self.searcher.is_pruned(trial_id))
            wall = time.time() - self._started[trial_id] if trial_id in self._started else None
            if why := log_trial_end(self.client, run_id, trial_id, result, status, trial.checkpoint, wall):
                print(f"warning: trial {trial_id}'s files could not be stored in MLflow ({why}; its run is tagged "
                      f"htnet.artifacts_error): they are kept in Ray's storage, {trial.checkpoint.path}",
                      file=sys.stderr, flush=True)
        else:
            set_tags(self.client, run_id, {"htnet.status": "failed", "htnet.error": error_text(trial), **failed_tags})
            retry(self.client.set_terminated, run_id, "FAILED")
        if "htnet.retried" not in (failed_tags or {}):
            self._terminal.add(trial_id)


def sync(client, experiment_id, parent_run_id, search_name, space, analysis, overrides, optuna_numbers,
         dataset=None):
    """Log every ended trial of Ray's experiment (`analysis`: tune.ExperimentAnalysis) that MLflow lacks, nothing
    twice, into its open run or else a new one (attempt + 1), tagged htnet.backfilled; returns their trial ids."""
    table = trial_table(client, experiment_id, parent_run_id, latest=False)
    histories, filled = analysis.trial_dataframes, []
    for trial in [t for t in analysis.trials if t.status in ("TERMINATED", "ERROR")]:
        mine = table[table["trial_id"] == trial.trial_id]
        live = mine[~mine["retried"]]
        ended = live[live["status"].isin(TERMINAL)]
        # its status tag made it, the end of the run did not
        for run_id, status in ended.loc[ended["run_status"] == "RUNNING", ["run_id", "status"]].values:
            _ensure_dataset(client, run_id, dataset)
            retry(client.set_terminated, run_id, run_status(status))
        if len(ended):
            continue
        result = dict(trial.last_result or {})
        error = {"htnet.error": error_text(trial)} if trial.status == "ERROR" else {}
        tags = {"htnet.backfilled": "true", **({"htnet.failures": trial.num_failures} if trial.num_failures else {}),
                **error, **device_tags(result)}
        if len(open_runs := live[live["status"].isin(["running", "interrupted"])]):
            run_id = open_runs["run_id"].iloc[-1]
            retry(client.update_run, run_id, status="RUNNING")
            _ensure_dataset(client, run_id, dataset)
        else:
            run_id = create_trial_run(client, experiment_id, parent_run_id, search_name, space, overrides, trial,
                                      max(mine["attempt"], default=0) + 1, optuna_numbers.get(trial.trial_id),
                                      dataset)
        history = histories.get(trial.trial_id)
        by_step = {int(row["step"]): curve_of(row, space.metric)
                   for row in ([] if history is None else history.to_dict("records"))
                   if is_number(row.get("step")) and row.get("htnet_status") != "failed"}
        for step, curve in sorted(by_step.items()):  # a step reported twice: its last report
            log_metrics(client, run_id, curve, step=step)
        log_trial_end(client, run_id, trial.trial_id, result, "failed" if error else trial_status(result),
                      trial.checkpoint, result.get("time_total_s"), tags)
        filled.append(trial.trial_id)
    return filled


def _ensure_dataset(client, run_id, dataset):  # MLflow may have stopped answering before the run took its data
    if dataset and not retry(client.get_run, run_id).inputs.dataset_inputs:
        log_dataset(client, run_id, *dataset)


def mark_interrupted(client, experiment_id, parent_run_id):
    """A search stopped before its end (Ctrl+C): its open trial runs say so; a resumed search reopens them."""
    table = trial_table(client, experiment_id, parent_run_id, latest=False)
    for run_id in table["run_id"][table["run_status"] == "RUNNING"]:
        set_tags(client, run_id, {"htnet.status": "interrupted"})
        retry(client.set_terminated, run_id, "KILLED")
