"""End-to-end searches on a local Ray with 2 CPUs: real Ray Tune, Optuna and MLflow.

Trials are STSTNet LOSO runs on 6 synthetic subjects (2 epochs): a few seconds each.
"""
import dataclasses
import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from search import tracking
from search.driver import runner
from search.driver.stores import load_data
from search_fixtures import (free_port, launch_mlflow_server, local_ray, optuna_trials,  # noqa: F401
                             parent_run, run_search_and_meanwhile, search_options, stop_mlflow_server,
                             store_client, trial_runs, wait_for_mlflow_server, write_space)

PROTOCOLS = ("paper", "final", "inner")
DATASETS = ("full", "smic", "casme2", "samm")


def test_tiny_search_two_concurrent_trials(local_ray, tmp_path, capsys):
    space = write_space(tmp_path / "tiny.py", num_samples=2, max_concurrent_trials=2)
    # Half a GPU per trial: two trials share the (logical) GPU at once.
    options = search_options(tmp_path, space, "tiny", subjects="6", gpus_per_trial=0.5, save_weights=True)
    summary = runner.run_search(options)
    assert summary["complete"] and summary["counts"] == {"finished": 2}
    uri = options.tracking_uri

    parent = parent_run(uri, "tiny")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["htnet.objective"] == "inner_val_uf1"
    assert parent.data.tags["htnet.objective_protocol"] == "inner"
    assert parent.data.metrics["trials_finished"] == 2
    note = MlflowClient(uri).get_experiment(parent.info.experiment_id).tags["mlflow.note.content"]
    assert all(words in note for words in ("inner_val_uf1", "running_<objective>", "partial_<metric>", "(pruned)"))

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    provenance = {"mlflow.source.git.commit": commit,
                  "htnet.data_fingerprint": tracking.provenance(load_data(summary["manifest"]["data"])[0])["htnet_data"]}
    assert provenance.items() <= parent.data.tags.items()
    # the space file's source, stored with the search (what `search resume` runs) and on the parent run
    assert (tmp_path / "runs" / "searches" / "tiny.space.py").read_text() == space.read_text()
    assert "space.py" in {a.path for a in MlflowClient(uri).list_artifacts(parent.info.run_id)}
    runs = trial_runs(uri, "tiny")
    assert len(runs) == 2 and len({r.data.tags["htnet.trial_id"] for r in runs}) == 2
    client = MlflowClient(uri)
    for run in runs:
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        assert run.info.status == "FINISHED" and tags["htnet.status"] == "finished"
        assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["htnet.role"] == "trial"
        assert tags["htnet.device"] == "cpu" and tags["htnet.optuna_trial"].isdigit()
        assert provenance.items() <= tags.items() and tags["htnet.git_dirty"] in ("true", "false")
        assert f"torch={torch.__version__}" in tags["htnet.versions"] and "mlflow=" in tags["htnet.versions"]
        assert tags["htnet.resources"] == "cpu=1,gpu=0.5" and tags["htnet.sampled"] == "lr,batch_size"
        assert params["model"] == "ststnet" and params["epochs"] == "2" and params["subjects"] == "6"
        assert params["save_weights"] == "True"
        # the whole LOSO config the trainable ran, defaults too, and the group size the engine picked
        from htnet.loso import LosoConfig
        assert {f.name for f in dataclasses.fields(LosoConfig)} - {"model_config"} <= set(params)
        assert (params["engine"], params["optimizer"], params["seed"], params["inner_val_subjects"],
                params["device"], params["fold_group_size"]) == ("batched", "adam", "1", "2", "cpu", "null")
        assert 1 <= int(params["resolved.fold_group_size"]) <= 6
        assert 1e-3 <= float(params["lr"]) <= 1e-2
        # a name to scan in mlflow ui: the model, the sampled values and the trial's number
        lr, batch = f"{float(params['lr']):.1e}".replace("e-0", "e-"), params["batch_size"]
        assert run.info.run_name in (f"ststnet lr{lr} bs{batch} #{int(tags['htnet.optuna_trial']):02d}",
                                     f"ststnet lr{lr} bs{batch} #{tags['htnet.trial_id']}"), run.info.run_name
        for protocol in PROTOCOLS:
            for dataset in DATASETS:
                for m in ("uf1", "uar"):
                    assert 0 <= metrics[f"{protocol}_{dataset}_{m}"] <= 1
        assert metrics["folds_done"] == 6 and metrics["wall_time_s"] > 0 and metrics["trial_wall_time_s"] > 0
        # the objective as the trial went: one metric's history, step = folds done
        running = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "running_inner_val_uf1")}
        assert sorted(running) == [1, 2, 3, 4, 5, 6] and running[6] == pytest.approx(metrics["inner_val_uf1"])
        assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "folds_done")}) == sorted(running)
        assert not [k for k in metrics if k.startswith(("curve_", "partial_"))]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "predictions.csv", "history.csv", "metrics.json",
                "confusion_matrix.png", "learning_curve.png", "weights"} <= artifacts
        weights = client.list_artifacts(run.info.run_id, "weights")
        assert len(weights) == 6 and all(w.path.endswith(".pth") for w in weights)  # one per subject
    # The parent run: the best trial's test UF1/UAR of every protocol and dataset.
    best_run = next(r for r in runs if r.info.run_id == parent.data.tags["htnet.best_run_id"])
    assert best_run.data.metrics["inner_val_uf1"] == max(r.data.metrics["inner_val_uf1"] for r in runs)
    assert parent.data.metrics["best_inner_val_uf1"] == best_run.data.metrics["inner_val_uf1"]
    for key in (f"{p}_{d}_{m}" for p in PROTOCOLS for d in DATASETS for m in ("uf1", "uar")):
        assert parent.data.metrics[f"best_{key}"] == best_run.data.metrics[key]
    # Two trials ran at the same time.
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))

    trials = optuna_trials(tmp_path / "runs", "tiny")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    by_id = {r.data.tags["htnet.trial_id"]: r for r in runs}
    for t in trials:
        run = by_id[t.user_attrs["ray_trial_id"]]
        assert math.isclose(t.value, run.data.metrics["inner_val_uf1"])
        assert sorted(t.intermediate_values) == [1, 2, 3, 4, 5, 6]

    best = summary["best_config"]
    assert best.is_file() and "model: ststnet" in best.read_text()
    out = capsys.readouterr().out
    assert "top trials:" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    assert "python -m htnet train --config" in out

    # `status` reads the same records back.
    runner.status(tmp_path / "runs", "tiny")
    assert "2 finished" in capsys.readouterr().out
    with pytest.raises(runner.UserError, match="search 'tiny' exists"):
        runner.run_search(options)


def weak_and_strong_search(tmp_path, name, pruner):
    """Six trials, two at a time, objective the paper protocol's UF1. Random sampler seed 10 draws
    lr 3e-3, 3e-3, 1e-7, 1e-7, 3e-3, 1e-7 (1e-7 cannot learn in 3 epochs)."""
    space = write_space(
        tmp_path / f"{name}.py", num_samples=6, max_concurrent_trials=2,
        sampler={"type": "random", "seed": 10}, pruner=pruner, fixed={"epochs": 3, "batch_size": 16},
        space={"lr": {"choice": [3.0e-3, 1.0e-7]}, "seed": {"choice": [1, 2, 3]}}, objective="paper")
    options = search_options(tmp_path, space, name)
    summary = runner.run_search(options)
    assert summary["complete"]
    return options, summary, optuna_trials(tmp_path / "runs", name)


def test_weak_configurations_are_pruned_by_the_optuna_pruner(local_ray, tmp_path):
    """lr 1e-7 cannot learn in 3 epochs: the median pruner stops such trials early. The objective
    here is the paper protocol's test UF1, picked explicitly, and tagged on every run.
    Random sampler seed 10 draws lr 3e-3, 3e-3, 1e-7, 1e-7, 3e-3, 1e-7: the first trials to finish
    are strong ones, and one finished trial arms the pruner, so which trials are pruned does not
    depend on which of the two concurrent trials happens to finish first."""
    options, summary, trials = weak_and_strong_search(
        tmp_path, "prune", {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 1})
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [(t.state, t.params, dict(t.intermediate_values)) for t in trials]
    assert all(t.user_attrs["pruned_at_step"] < 6 for t in pruned)
    runs = {r.data.tags["htnet.trial_id"]: r for r in trial_runs(options.tracking_uri, "prune")}
    assert all(r.data.tags["htnet.objective_protocol"] == "paper" for r in runs.values())
    client = MlflowClient(options.tracking_uri)
    for t in trials:
        run = runs[t.user_attrs["ray_trial_id"]]
        metrics = run.data.metrics
        running = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "running_paper_full_uf1")}
        assert sorted(running) == list(range(1, int(metrics["folds_done"]) + 1))
        if t.state == TrialState.PRUNED:
            # apart at a glance: KILLED (not FINISHED), named so, and its results only under partial_
            assert run.data.tags["htnet.status"] == "pruned" and run.info.status == "KILLED"
            assert run.info.run_name.endswith(" (pruned)")
            assert metrics["folds_done"] < 6  # stopped in Ray Tune before its last fold
            assert int(run.data.tags["htnet.pruned_at_step"]) == t.user_attrs["pruned_at_step"]
            assert not [k for k in metrics if k.endswith(("_uf1", "_uar")) and not k.startswith(("partial_", "running_"))]
            assert metrics["partial_paper_full_uf1"] == running[metrics["folds_done"]]
            assert {"partial_inner_full_uar", "partial_final_full_uf1"} <= set(metrics)
        else:
            assert t.state == TrialState.COMPLETE and run.data.tags["htnet.status"] == "finished"
            assert run.info.status == "FINISHED" and not run.info.run_name.endswith("(pruned)")
            assert metrics["folds_done"] == 6 and not [k for k in metrics if k.startswith("partial_")]
            assert metrics["paper_full_uf1"] == running[6]
    # The leaderboard still ranks pruned trials after the finished ones, by their partial objective.
    from search.reports.leaderboard import leaderboard, open_store
    board = leaderboard(open_store(options.tracking_uri), ["prune"])
    assert board["status"].tolist() == ["finished"] * (6 - len(pruned)) + ["pruned"] * len(pruned)
    for row in board.to_dict("records"):
        metrics = runs[row["trial"]].data.metrics
        assert row["objective_value"] == metrics.get("paper_full_uf1", metrics.get("partial_paper_full_uf1"))
    # Ray Tune stopped the pruned trials: their last result is marked and is not the last fold.
    from ray import tune
    analysis = tune.ExperimentAnalysis(summary["manifest"]["ray_path"])
    assert {t.status for t in analysis.trials} == {"TERMINATED"}
    stopped = [t for t in analysis.trials if t.last_result.get("htnet_status") == "pruned"]
    assert len(stopped) == len(pruned) and all(t.last_result["step"] < 6 for t in stopped)


def test_successive_halving_prunes_through_ray(local_ray, tmp_path):
    """search/spaces/htnet.py uses successive halving (search.pruners, on Optuna's public BasePruner): it
    judges each rung from the trials' reported values, which the Ray bridge reports once per step.
    Same weak/strong draws as above; rungs at 1, 3 folds."""
    options, _, trials = weak_and_strong_search(
        tmp_path, "asha", {"type": "successive_halving", "min_resource": 1, "reduction_factor": 3})
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and len(pruned) < len(trials), [(t.state, t.params, t.system_attrs) for t in trials]
    assert all(1 in t.intermediate_values for t in trials)  # each reached rung 0 (1 fold)
    assert all(t.user_attrs["pruned_at_step"] < 6 for t in pruned)
    runs = {r.data.tags["htnet.trial_id"]: r for r in trial_runs(options.tracking_uri, "asha")}
    for t in trials:
        run = runs[t.user_attrs["ray_trial_id"]]
        status = "pruned" if t.state == TrialState.PRUNED else "finished"
        assert run.data.tags["htnet.status"] == status
        assert (run.data.metrics["folds_done"] < 6) == (status == "pruned")


def test_wilcoxon_pruner_gets_each_folds_own_objective_through_ray(local_ray, tmp_path):
    """The Wilcoxon pruner pairs LOSO folds across trials: through the Ray bridge each fold's own
    objective reaches Optuna at step = its fold number (the pooled one goes to MLflow's curve).
    Same weak/strong draws as above; with 6 folds a weak trial is 3 worse folds from p = 0.125."""
    options, _, trials = weak_and_strong_search(tmp_path, "wilcoxon", {"type": "wilcoxon", "p_threshold": 0.2})
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned and len(pruned) < len(trials), [(t.state, t.params, dict(t.intermediate_values)) for t in trials]
    assert all(t.params["lr"] == 1.0e-7 for t in pruned)
    runs = {r.data.tags["htnet.trial_id"]: r for r in trial_runs(options.tracking_uri, "wilcoxon")}
    client = MlflowClient(options.tracking_uri)
    per_fold_differs = False
    for t in trials:
        run = runs[t.user_attrs["ray_trial_id"]]
        steps = sorted(t.intermediate_values)
        assert steps == list(range(1, len(steps) + 1)) and len(steps) == min(5, t.user_attrs.get("pruned_at_step", 5))
        pooled = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "running_paper_full_uf1")}
        assert t.intermediate_values[1] == pytest.approx(pooled[1])  # one fold: its own objective is the pooled one
        per_fold_differs |= any(t.intermediate_values[s] != pytest.approx(pooled[s]) for s in steps[1:])
    assert per_fold_differs


def test_trial_whose_worker_dies_is_retried(local_ray, tmp_path):
    """SIGKILL the trial's worker process after its first result: Ray retries the trial
    (FailureConfig) from its last checkpoint, training only the folds not done (counted in
    fold-epochs), and its predictions equal an uninterrupted run's; MLflow keeps the failed attempt
    as FAILED and the retry as FINISHED."""
    space = write_space(tmp_path / "kill.py", num_samples=1, max_concurrent_trials=1, max_failures=1,
                        fixed={"epochs": 40})
    options = search_options(tmp_path, space, "kill")

    def running_worker():
        """After the second fold's result: Ray registers a reported checkpoint (a save round trip to the
        worker) before it takes the next result, so the first fold's checkpoint is then Ray's."""
        for run in trial_runs(options.tracking_uri, "kill"):
            pid = run.data.tags.get("htnet.worker_pid")
            if run.info.status == "RUNNING" and pid and run.data.metrics.get("folds_done", 0) >= 2:
                return int(pid)
        return None

    summary, killed = run_search_and_meanwhile(options, running_worker, lambda pid: os.kill(pid, signal.SIGKILL),
                                               timeout=120, what="a trial's first result")
    assert "value" in killed, killed
    assert summary["complete"] and summary["counts"] == {"finished": 1}

    runs = sorted(trial_runs(options.tracking_uri, "kill"), key=lambda r: int(r.data.tags["htnet.attempt"]))
    assert [r.data.tags["htnet.attempt"] for r in runs] == ["1", "2"]
    assert len({r.data.tags["htnet.trial_id"] for r in runs}) == 1
    failed, retried = runs
    assert failed.info.status == "FAILED" and failed.data.tags["htnet.status"] == "failed"
    assert failed.data.tags["htnet.retried"] == "true" and failed.data.tags["htnet.worker_pid"] == str(killed["value"])
    assert failed.data.tags["htnet.error"]
    assert retried.info.status == "FINISHED" and retried.data.tags["htnet.status"] == "finished"
    assert retried.data.metrics["folds_done"] == 6
    metrics = retried.data.metrics
    assert 0 < metrics["fold_epochs_resumed"] < metrics["fold_epochs"]   # at least the reported fold was kept
    assert metrics["fold_epochs_attempt"] == metrics["fold_epochs"] - metrics["fold_epochs_resumed"]
    assert metrics["fold_epochs_trained"] == metrics["fold_epochs"]   # attempt 1's checkpointed folds + the retry's
    client = store_client(options.tracking_uri)
    folder = Path(client.download_artifacts(retried.info.run_id, "", str(tmp_path / "artifacts")))
    assert not (folder / "folds").exists() and (folder / "attempts.csv").is_file()
    from htnet.loso import run_loso
    data, _ = load_data(summary["manifest"]["data"])
    uninterrupted = run_loso(yaml.safe_load((folder / "config.yaml").read_text()), data, out_dir=tmp_path / "again",
                             progress=False)
    assert uninterrupted.fold_epochs == metrics["fold_epochs"]
    assert (folder / "predictions.csv").read_bytes() == (tmp_path / "again" / "predictions.csv").read_bytes()
    assert (folder / "history.csv").read_bytes() == (tmp_path / "again" / "history.csv").read_bytes()
    assert retried.data.tags["htnet.worker_pid"] != str(killed["value"])
    [trial] = optuna_trials(tmp_path / "runs", "kill")
    assert trial.state == TrialState.COMPLETE
    from ray import tune
    [ray_trial] = tune.ExperimentAnalysis(summary["manifest"]["ray_path"]).trials
    assert ray_trial.status == "TERMINATED" and ray_trial.run_metadata.num_failures == 1


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1, started with the module (it takes a while to come up)
    and stopped after it; only the test that logs to it waits for it."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    server = launch_mlflow_server(folder, port)
    yield {"uri": f"http://127.0.0.1:{port}", "port": port, "process": server, "folder": folder}
    stop_mlflow_server(server, signal.SIGTERM)


def test_search_logs_to_a_real_mlflow_server(local_ray, mlflow_server, tmp_path):
    uri = mlflow_server["uri"]
    wait_for_mlflow_server(mlflow_server["process"], mlflow_server["port"], mlflow_server["folder"])
    space = write_space(tmp_path / "server.py", num_samples=2, max_concurrent_trials=2)
    options = search_options(tmp_path, space, "server")
    options.tracking_uri = uri
    summary = runner.run_search(options)
    assert summary["complete"]
    client = MlflowClient(uri)
    parent = parent_run(uri, "server")
    assert parent.info.status == "FINISHED"
    runs = trial_runs(uri, "server")
    assert len(runs) == 2 and {r.data.tags["htnet.status"] for r in runs} == {"finished"}
    for run in runs:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert {"predictions.csv", "confusion_matrix.png", "config.yaml"} <= \
            {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the local default store
    assert list((mlflow_server["folder"] / "artifacts").rglob("predictions.csv"))  # uploaded through the server


def test_configurations_that_cannot_train_fail_without_retries(local_ray, tmp_path):
    """Four trials at once (grid sampler, Optuna journal storage): SGD with lr 1e12 diverges. Such a trial reports
    failed (Optuna FAIL, MLflow FAILED) and is not retried: retries are for workers that die. (A configuration the
    model cannot build never starts a search: the start-up check finds it, test_search_space.py.)"""
    space = write_space(
        tmp_path / "grid.py", num_samples=10, max_concurrent_trials=4, max_failures=2,
        resources={"cpu": 0.5, "gpu": 0}, sampler={"type": "grid"}, fixed={"optimizer": "sgd"},
        space={"lr": {"choice": [1.0e12, 1.0e-2]}, "seed": {"choice": [1, 2]}})
    options = search_options(tmp_path, space, "grid", optuna_storage=f"journal:{tmp_path / 'optuna.log'}")
    summary = runner.run_search(options)
    assert summary["complete"] and summary["counts"] == {"finished": 2, "failed": 2}
    assert summary["manifest"]["settings"]["num_samples"] == 4  # a grid of 4 points
    runs = trial_runs(options.tracking_uri, "grid")
    assert len(runs) == 4 and all(r.data.tags["htnet.attempt"] == "1" for r in runs)
    for run in runs:
        if float(run.data.params["lr"]) == 1.0e12:
            assert run.info.status == "FAILED" and run.data.tags["htnet.status"] == "failed"
            assert run.data.tags["htnet.error"].startswith("TrainingDiverged: training loss is")
        else:
            assert run.info.status == "FINISHED" and run.data.tags["htnet.status"] == "finished"
    assert not (tmp_path / "runs" / "optuna.db").exists()  # the study is in the journal file
    trials = optuna_trials(tmp_path / "runs", "grid", options.optuna_storage)
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]
    assert sorted((t.params["lr"], t.params["seed"]) for t in trials) == [(1.0e-2, 1), (1.0e-2, 2), (1.0e12, 1),
                                                                          (1.0e12, 2)]
    assert all("TrainingDiverged" in t.user_attrs["error"] for t in trials if t.state == TrialState.FAIL)
