"""MLflow as a view of Ray's results: `sync` logs whatever MLflow lacks of a search's ended trials; runs of a
search stopped before its end are marked interrupted."""
from search.tracking.schema import TERMINAL, curve_of, device_tags, is_number, run_status, trial_status, trial_table
from search.tracking.store import retry
from search.tracking.writer import (create_trial_run, error_text, log_dataset, log_metrics, log_trial_end,
                                   set_tags)


def sync(client, experiment_id, parent_run_id, search_name, space, analysis, overrides, optuna_numbers,
         dataset=None):
    """Log every ended trial of Ray's experiment (`analysis`: tune.ExperimentAnalysis) that MLflow lacks, nothing
    twice (a no-op where MLflow has them all); returns the trial ids filled in. An ended Ray trial without an ended,
    non-retried run gets its end logged into its open run, or else into a new run (attempt + 1), with its curve from
    Ray's results and its files from its last checkpoint (tagged htnet.backfilled)."""
    table = trial_table(client, experiment_id, parent_run_id, latest=False)
    histories, filled = analysis.trial_dataframes, []
    for trial in analysis.trials:
        if trial.status not in ("TERMINATED", "ERROR"):
            continue
        mine = table[table["trial_id"] == trial.trial_id]
        live = mine[~mine["retried"]]
        ended = live[live["status"].isin(TERMINAL)]
        running = ended[ended["run_status"] == "RUNNING"]  # its status tag made it, the end of the run did not
        for run_id, status in zip(running["run_id"], running["status"]):
            _ensure_dataset(client, run_id, dataset)
            retry(client.set_terminated, run_id, run_status(status))
        if len(ended):
            continue
        result = dict(trial.last_result or {})
        failures = {"htnet.failures": trial.num_failures} if trial.num_failures else {}
        error = {"htnet.error": error_text(trial)} if trial.status == "ERROR" else {}
        tags = {"htnet.backfilled": "true", **failures, **error, **device_tags(result)}
        open_runs = live[live["status"].isin(["running", "interrupted"])]
        if len(open_runs):
            run_id = open_runs["run_id"].iloc[-1]
            retry(client.update_run, run_id, status="RUNNING")
            _ensure_dataset(client, run_id, dataset)
        else:
            run_id = create_trial_run(client, experiment_id, parent_run_id, search_name, space, overrides, trial,
                                      max(mine["attempt"], default=0) + 1, optuna_numbers.get(trial.trial_id),
                                      dataset)
        history = histories.get(trial.trial_id)
        rows = [] if history is None else history.to_dict("records")
        by_step = {int(row["step"]): curve_of(row, space.metric) for row in rows
                   if is_number(row.get("step")) and row.get("htnet_status") != "failed"}
        for step, curve in sorted(by_step.items()):  # a step reported twice: its last report
            log_metrics(client, run_id, curve, step=step)
        log_trial_end(client, run_id, trial.trial_id, result, "failed" if error else trial_status(result),
                      trial.checkpoint, result.get("time_total_s"), tags)
        filled.append(trial.trial_id)
    return filled


def _ensure_dataset(client, run_id, dataset):
    """A run made live whose dataset input MLflow did not take (it stopped answering in between) gets it now."""
    if dataset and not retry(client.get_run, run_id).inputs.dataset_inputs:
        log_dataset(client, run_id, *dataset)


def mark_interrupted(client, experiment_id, parent_run_id):
    """A search stopped before its end (Ctrl+C): its open trial runs say so; a resumed search reopens them."""
    table = trial_table(client, experiment_id, parent_run_id, latest=False)
    for run_id in table["run_id"][table["run_status"] == "RUNNING"]:
        set_tags(client, run_id, {"htnet.status": "interrupted"})
        retry(client.set_terminated, run_id, "KILLED")
