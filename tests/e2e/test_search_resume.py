"""Resume after the driver is killed: `python -m search run` in a subprocess, SIGKILL mid-search,
then `python -m search run --resume NAME`; no trial may be lost or run twice.

Every wait is for an event (MLflow states, a process's exit, the killed session's processes gone);
the timeouts are safety nets for a busy 2-core machine, and a process that dies ends its wait at
once with its log."""
import json
import os
import signal
from collections import Counter
from pathlib import Path

import yaml
from optuna.trial import TrialState

from search import cli

from search_fixtures import (died, kill_session, optuna_trials, parent_run, ray_processes, ray_tmpdir,  # noqa: F401
                             start_cli, trial_runs, wait_for_exit, wait_until, write_space)

SAFETY_NET = 1800  # seconds; each step ends as soon as its event happens


def stop(process):
    """The process and its Ray session gone, whatever happened to the test."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    kill_session(process)


def start_driver(tmp_path, space, name, ray_tmpdir):
    """`python -m search run SPACE --name NAME` in a subprocess, quiet, with its stores under tmp_path:
    (the process, its log, the storage folder, the tracking URI, the storage/CPU arguments, the env)."""
    storage, uri = tmp_path / "runs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--storage", str(storage), "--num-cpus", "2"]
    env = {"RAY_TMPDIR": str(ray_tmpdir)}
    log = tmp_path / "driver.log"
    driver = start_cli(["run", str(space), "--name", name, "--tracking-uri", uri, "--verbose", "0", *common],
                       log, env=env)
    return driver, log, storage, uri, common, env


def kill_driver_when(driver, log, condition, what, ray_tmpdir):
    """SIGKILL the driver once `condition()` holds; return when its Ray session is gone too (Ray ends a local
    session whose driver died), so a resumed search starts a fresh one."""
    try:
        wait_until(condition, timeout=SAFETY_NET, interval=0.3, what=what, unless=died(driver, log))
        os.kill(driver.pid, signal.SIGKILL)
        wait_for_exit(driver, SAFETY_NET)
    finally:
        stop(driver)
    wait_until(lambda: not ray_processes(ray_tmpdir), timeout=SAFETY_NET, what="the killed Ray session to end")


def run_to_exit(args, log, env):
    """`python -m search ARGS` to its end: (exit code, its log)."""
    process = start_cli(args, log, env=env)
    try:
        return wait_for_exit(process, SAFETY_NET, log), log.read_text()
    finally:
        stop(process)


def test_resume_after_the_driver_is_killed(tmp_path, ray_tmpdir):
    samples = 4
    space = write_space(tmp_path / "resume.py", num_samples=samples, max_concurrent_trials=2,
                        fixed={"epochs": 4})
    driver, log, storage, uri, common, env = start_driver(tmp_path, space, "resume", ray_tmpdir)

    def mid_search():
        runs = trial_runs(uri, "resume")
        finished = [r for r in runs if r.data.tags.get("htnet.status") == "finished"]
        running = [r for r in runs if r.info.status == "RUNNING"
                   and r.data.metrics.get("running_inner_val_uf1") is not None]
        return finished and running
    kill_driver_when(driver, log, mid_search, "one finished and one running trial", ray_tmpdir)
    before = trial_runs(uri, "resume")
    assert sum(r.data.tags.get("htnet.status") == "finished" for r in before) < samples
    assert yaml.safe_load((storage / "searches" / "resume.yaml").read_text())["status"] == "running"
    # the space file changes on disk meanwhile: the search goes on with the copy it started with, and says so
    started_with = space.read_text()
    space.write_text(started_with.replace("trial.suggest_float('lr', 0.001, 0.01, log=True)", "0.5"))
    assert space.read_text() != started_with

    code, output = run_to_exit(["run", "--resume", "resume", *common], tmp_path / "resume.log", env)
    assert code == 0, output[-5000:]
    assert (f"{space} has changed since the search started: it goes on with the copy it started with, "
            f"{storage / 'searches' / 'resume.space.py'}") in output
    summary = [line for line in output.splitlines() if line.startswith("search resume (")]
    assert summary and summary[-1].startswith("search resume (finished): 4 finished"), output[-5000:]

    runs = trial_runs(uri, "resume")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    kept = [r for r in runs if r.data.tags.get("htnet.lost") != "true"]
    lost = [r for r in runs if r.data.tags.get("htnet.lost") == "true"]
    assert all(r.info.status == "KILLED" and r.data.tags["htnet.status"] == "failed" for r in lost)
    per_trial = Counter(r.data.tags["htnet.trial_id"] for r in kept)
    assert len(per_trial) == samples and set(per_trial.values()) == {1}, per_trial  # none twice
    assert {r.data.tags["htnet.status"] for r in kept} == {"finished"}
    assert all(r.data.metrics["folds_done"] == 6 for r in kept)
    assert all(1e-3 <= float(r.data.params["lr"]) <= 1e-2 for r in kept)  # the stored copy's space, not 0.5
    assert parent_run(uri, "resume").info.status == "FINISHED"

    trials = optuna_trials(storage, "resume")
    states = Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] == samples and states[TrialState.RUNNING] == 0
    requeued = {t.user_attrs.get("requeued_from") for t in trials} - {None}
    assert {t.number for t in trials if t.state == TrialState.FAIL} == requeued
    assert {t.user_attrs["ray_trial_id"] for t in trials if t.state == TrialState.COMPLETE} == set(per_trial)

    from ray import tune
    analysis = tune.ExperimentAnalysis(str(storage / "ray" / "resume"))
    assert sorted(t.status for t in analysis.trials) == ["TERMINATED"] * samples
    assert yaml.safe_load((storage / "searches" / "resume.yaml").read_text())["status"] == "finished"


def test_a_trial_running_when_the_driver_dies_resumes_from_its_fold_checkpoint(tmp_path, ray_tmpdir, capsys):
    """`search resume` continues the trial that was running from its last fold checkpoint in Ray's
    storage, even where Ray's snapshot names a checkpoint Ray had deleted: it trains only the folds not
    done, and counts each fold once. Before, each damaged file it loads is refused (refuses_damaged_state)."""
    space = write_space(tmp_path / "folds.py", num_samples=1, max_concurrent_trials=1, fixed={"epochs": 40})
    driver, log, storage, uri, common, env = start_driver(tmp_path, space, "folds", ray_tmpdir)
    # 3 folds reported: Ray has registered a checkpoint and snapshotted the experiment
    # (forced once a trial has checkpointed num_to_keep = 2 times since the last snapshot)
    kill_driver_when(driver, log, lambda: [r for r in trial_runs(uri, "folds") if r.info.status == "RUNNING"
                                           and r.data.metrics.get("folds_done", 0) >= 3],
                     "a trial 3 folds in", ray_tmpdir)
    # Ray deletes an old checkpoint before it snapshots the newer one: a driver killed in between leaves the
    # snapshot naming a deleted checkpoint, with a newer one beside it. Made so here, by moving it.
    from ray import tune
    [trial] = tune.ExperimentAnalysis(str(storage / "ray" / "folds")).trials
    named = Path(trial.checkpoint.path)
    named.rename(named.with_name("checkpoint_999999"))
    refuses_damaged_state(storage, uri, common, capsys)

    code, output = run_to_exit(["resume", "folds", *common], tmp_path / "resume.log", env)
    assert code == 0, output[-5000:]
    assert f"trial {trial.trial_id}: Ray's snapshot named an older checkpoint than the trial's last" in output
    [run] = [r for r in trial_runs(uri, "folds") if r.data.tags.get("htnet.status") == "finished"]
    metrics = run.data.metrics
    assert metrics["fold_epochs"] == 6 * 80 and 80 <= metrics["fold_epochs_resumed"] < 6 * 80
    assert metrics["fold_epochs_attempt"] == metrics["fold_epochs"] - metrics["fold_epochs_resumed"]


def truncated(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def trial_state_cut(path):
    state = json.loads(path.read_text())
    state["trial_data"][0][0] = state["trial_data"][0][0][:150]
    path.write_text(json.dumps(state))


def refuses_damaged_state(storage, uri, common, capsys):
    """Issue 27: each file of Ray's experiment that `search resume` loads, damaged in turn, is one line naming it,
    exit 2, with the search's record and MLflow as they were; the file is then put back."""
    experiment = storage / "ray" / "folds"
    [checkpoint] = experiment.glob("*/checkpoint_999999")
    cases = [(next(experiment.glob("experiment_state-*.json")), truncated),
             (next(experiment.glob("experiment_state-*.json")), trial_state_cut),
             (experiment / "tuner.pkl", truncated),
             (next(experiment.glob("searcher-state-*.pkl")), truncated),
             (next(checkpoint.glob("folds/*.json")), truncated),
             (checkpoint / "attempts.csv", lambda path: path.write_text("fold,epochs\n1,2\n"))]
    record = storage / "searches" / "folds.yaml"

    def mlflow_states():
        return {(r.info.run_id, r.info.status) for r in [*trial_runs(uri, "folds"), parent_run(uri, "folds")]}
    mlflow_before = mlflow_states()
    for path, damage in cases:
        kept, record_before = path.read_bytes(), record.read_bytes()
        damage(path)
        capsys.readouterr()
        code = cli.main(["resume", "folds", *common])   # in this process: refused before Ray starts
        errors = capsys.readouterr().err.splitlines()
        assert code == 2 and len(errors) == 1 and errors[0].startswith("error: search 'folds': "), errors
        assert str(path) in errors[0] and "nothing was changed" in errors[0], errors
        assert record.read_bytes() == record_before
        assert mlflow_states() == mlflow_before
        path.write_bytes(kept)
