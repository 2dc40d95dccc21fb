"""Faults tried on purpose, with nothing lost: real processes killed with SIGKILL, a real MLflow
server stopped mid-search, real files; nothing mocked.

Covered elsewhere (not repeated here):
- a trial's worker SIGKILLed mid-run is retried and finishes; MLflow keeps one FINISHED run for the
  trial and the failed attempt as FAILED (htnet.retried=true): test_search_e2e.py::
  test_trial_whose_worker_dies_is_retried.
- the search driver SIGKILLed mid-search: `search run --resume` completes it; one finished run per
  trial, as many as requested, none twice: test_search_resume.py::test_resume_after_the_driver_is_killed.
- bad input at the command line: test_bad_input.py (and test_cli.py).
"""
import ast
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from search import cli, tracking
from search.driver import runner, stores
from search_fixtures import (REPO, free_port, local_ray, start_mlflow_server, stop_mlflow_server, optuna_trials, parent_run,  # noqa: F401
                             run_search_and_meanwhile, search_options, trial_runs, write_space)

# ----------------------------------------------------------------------------- atomic writes

WRITER = r"""
import sys, time
from htnet.io import atomic_write

target, new, pause = sys.argv[1], open(sys.argv[2], "rb").read(), sys.argv[3] == "pause"
with atomic_write(target, "wb") as f:
    f.write(new[: len(new) // 2])
    f.flush()
    print("half written", flush=True)
    if pause:
        time.sleep(600)  # killed here
    f.write(new[len(new) // 2:])
"""


def predictions_bytes(n, seed):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"sample": [f"s{i}" for i in range(n)], "subject": "sub01", "dataset": "casme2",
                          "label": rng.integers(0, 3, n), "protocol": "final",
                          "prediction": rng.integers(0, 3, n), "epoch": 3})
    return frame.to_csv(index=False).encode()


def weights_bytes(tmp_path, seed):
    from htnet.models import create_model

    torch.manual_seed(seed)
    path = tmp_path / f"w{seed}.pth"
    torch.save(create_model("ststnet").state_dict(), path)
    return path.read_bytes()


def temp_files(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("kind", ["predictions.csv", "weights.pth", "leaderboard.md"])
def test_atomic_write_killed_mid_write_leaves_the_old_file(kind, tmp_path):
    """A process SIGKILLed half-way through writing leaves the old file whole; one that finishes
    leaves the new one whole; never half of one."""
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / kind
    if kind == "predictions.csv":
        old, new = predictions_bytes(200, 0), predictions_bytes(5000, 1)
    elif kind == "weights.pth":
        old, new = weights_bytes(tmp_path, 0), weights_bytes(tmp_path, 1)
    else:
        old = b"| rank | trial |\n|---|---|\n| 1 | a |\n"
        new = old + b"".join(f"| {i} | t{i} |\n".encode() for i in range(2, 3000))
    target.write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", WRITER, str(target), str(tmp_path / "new")]

    writer = subprocess.Popen([*command, "pause"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert writer.stdout.readline().strip() == "half written"
        [partial] = temp_files(folder)  # the half-written file is a hidden temp file beside it
        assert (folder / partial).stat().st_size == len(new) // 2
        assert target.read_bytes() == old
        writer.send_signal(signal.SIGKILL)
        assert writer.wait(timeout=30) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert target.read_bytes() == old  # the old file, whole
    if kind == "weights.pth":
        assert set(torch.load(target, weights_only=True)) == set(torch.load(tmp_path / "w0.pth", weights_only=True))
    elif kind == "predictions.csv":
        assert len(pd.read_csv(target)) == 200

    done = subprocess.run([*command, "go"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == new  # the new file, whole
    assert temp_files(folder) == [partial]  # only the killed writer's leftover, never read


def keep_old(paths, tmp_path):
    """Hard links to the current files: an in-place write would change them too."""
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=tmp_path, prefix="old-"))
    kept = {}
    for i, path in enumerate(paths):
        link = folder / str(i)
        os.link(path, link)
        kept[path] = (link, link.read_bytes())
    return kept


def assert_replaced(kept):
    for path, (link, content) in kept.items():
        assert link.read_bytes() == content, f"{path} was written in place"
        assert path.stat().st_ino != link.stat().st_ino, f"{path} was not replaced by a new file"
        assert not temp_files(path.parent), path.parent


def test_the_writers_replace_their_files_atomically(synth_data, tmp_path):
    """Predictions, history, metrics, config and weights (run_loso), `evaluate`'s predictions,
    leaderboard exports and search records are each written to a new file renamed over the old
    one (htnet.io.atomic_write): the old file is never written in place."""
    from htnet.cli import main as htnet_main
    from htnet.loso import run_loso
    from search.reports.leaderboard import write_exports

    out = tmp_path / "train"
    config = {"model": "ststnet", "epochs": 1, "batch_size": 32, "protocols": ["final"], "subjects": 2,
              "device": "cpu", "save_weights": True}
    run_loso(config, synth_data, out_dir=out, progress=False)
    written = sorted(p for p in out.rglob("*") if p.is_file())
    assert {p.name for p in written} >= {"predictions.csv", "history.csv", "metrics.json", "config.yaml"}
    assert len(list((out / "weights").glob("*.pth"))) == 2
    kept = keep_old(written, tmp_path)
    run_loso({**config, "seed": 2}, synth_data, out_dir=out, progress=False)
    assert_replaced(kept)

    evaluated = tmp_path / "evaluate"
    args = ["evaluate", "--data", synth_data.source, "--model", "ststnet", "--subjects",
            ",".join(p.stem for p in (out / "weights").glob("*.pth")), "--weights", str(out / "weights"),
            "--device", "cpu", "--out", str(evaluated)]
    assert htnet_main(args) == 0
    kept = keep_old([evaluated / "predictions.csv"], tmp_path)
    assert htnet_main(args) == 0
    assert_replaced(kept)

    exports = tmp_path / "exports"
    exports.mkdir()
    table = pd.DataFrame({"rank": [1, 2], "search": ["s", "s"], "trial": ["a", "b"], "status": ["finished"] * 2,
                          "objective_value": [0.5, 0.4]})
    paths = [exports / "board.csv", exports / "board.md", exports / "board.tex"]
    write_exports(table, csv=paths[0], markdown=paths[1], latex=paths[2], full=True)  # not a leaderboard's columns
    kept = keep_old(paths, tmp_path)
    write_exports(table.iloc[::-1], csv=paths[0], markdown=paths[1], latex=paths[2], full=True)
    assert_replaced(kept)

    stores.write_manifest(tmp_path / "runs", "x", {"name": "x", "status": "running"})
    record = stores.manifest_path(tmp_path / "runs", "x")
    kept = keep_old([record], tmp_path)
    stores.write_manifest(tmp_path / "runs", "x", {"name": "x", "status": "finished"})
    assert_replaced(kept)
    assert yaml.safe_load(record.read_text())["status"] == "finished"


# ----------------------------------------------------------------------------- security

SOURCE_DIRS = [REPO / "htnet", REPO / "search"]
FORBIDDEN_NAMES = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_ATTRIBUTES = {("yaml", "load"), ("yaml", "load_all"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
                        ("yaml", "unsafe_load_all"), ("yaml", "full_load_all"), ("pickle", "load"),
                        ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
                        ("marshal", "load"), ("marshal", "loads"), ("dill", "load"), ("dill", "loads"),
                        ("pd", "read_pickle"), ("pandas", "read_pickle"), ("joblib", "load")}
UNSAFE_MODULES = {"pickle", "cloudpickle", "marshal", "dill", "shelve", "joblib"}
# a search space is a Python file the user writes and runs, like a script: search.space compiles and runs its text
# (the file named on the command line, or the copy stored with the search); nothing else runs code read from data
RUNS_THE_SPACE_FILE = {("search/space.py", "exec"), ("search/space.py", "compile")}
# the searcher's state lives in Ray's experiment folder beside tuner.pkl, which Ray unpickles by design: the same
# trust boundary (search.driver.stores.check_restorable refuses a folder others could write), so it may pickle there
IN_RAYS_EXPERIMENT = "search/pruning.py"


def test_no_eval_no_unsafe_loading_in_the_code():
    """Weights load with torch.load(weights_only=True), YAML with yaml.safe_load; nothing is
    eval'ed, exec'ed or unpickled but the user's own search space file (RUNS_THE_SPACE_FILE)."""
    problems, torch_loads, files = [], 0, 0
    for folder in SOURCE_DIRS:
        for path in sorted(folder.rglob("*.py")):
            files += 1
            where = path.relative_to(REPO)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    names = {a.name for a in node.names}
                    if any(m.split(".")[0] in UNSAFE_MODULES for m in modules) and \
                            not (str(where) == IN_RAYS_EXPERIMENT and modules == ["pickle"]):
                        problems.append(f"{where}:{node.lineno}: imports {modules}")
                    if isinstance(node, ast.ImportFrom) and (node.module, "load") in FORBIDDEN_ATTRIBUTES & \
                            {(node.module, n) for n in names}:
                        problems.append(f"{where}:{node.lineno}: from {node.module} import load")
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                if isinstance(func, ast.Name) and func.id in FORBIDDEN_NAMES and \
                        (str(where), func.id) not in RUNS_THE_SPACE_FILE:
                    problems.append(f"{where}:{node.lineno}: {func.id}()")
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                    pair = (func.value.id, func.attr)
                    if pair in FORBIDDEN_ATTRIBUTES and (str(where), pair) != (IN_RAYS_EXPERIMENT, ("pickle", "load")):
                        problems.append(f"{where}:{node.lineno}: {pair[0]}.{pair[1]}()")
                    keywords = {k.arg: k.value for k in node.keywords}
                    if pair == ("torch", "load"):
                        torch_loads += 1
                        flag = keywords.get("weights_only")
                        if not (isinstance(flag, ast.Constant) and flag.value is True):
                            problems.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
                    if pair in (("np", "load"), ("numpy", "load")):
                        flag = keywords.get("allow_pickle")
                        if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                            problems.append(f"{where}:{node.lineno}: np.load(allow_pickle=...)")
    assert files > 20 and torch_loads >= 1
    assert not problems, "\n".join(problems)


def test_cluster_opens_only_ssh_and_the_readme_says_why():
    """The inbound rules Ray's AWS provider creates for cluster.yaml (its own function, no AWS
    call): port 22 from anywhere, everything else only between the cluster's own nodes. See also
    test_search_cluster_yaml.py (dashboard on 127.0.0.1, MLflow on the private address)."""
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    group = config["provider"].get("security_group", {})
    own = {"sg-htnet-cluster"}
    rules = _create_default_inbound_rules(own, group.get("IpPermissions", []))
    from_outside = [r for r in rules if r.get("IpRanges") or r.get("Ipv6Ranges") or r.get("PrefixListIds")]
    assert from_outside == [{"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    for rule in rules:
        if rule not in from_outside:
            assert {p["GroupId"] for p in rule["UserIdGroupPairs"]} <= own, rule
    for node_type in config["available_node_types"].values():  # no other group or interface attached
        assert not {"SecurityGroupIds", "NetworkInterfaces"} & set(node_type["node_config"]), node_type
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "0.0.0.0" not in start and "--ray-client-server-port" not in start

    readme = (REPO / "README.md").read_text()
    assert "Only SSH is open to the internet" in readme
    assert "no authentication" in readme and "port-forwarding" in readme
    assert "ray dashboard cluster.yaml" in readme and "ssh -i" in readme and " -L 5000:" in readme


# ----------------------------------------------------------------------------- searches

def test_a_diverging_trial_fails_cleanly_and_the_search_goes_on(local_ray, tmp_path):
    """lr 1e12 with SGD: the loss becomes NaN/inf; that trial reports failed (MLflow FAILED, Optuna
    FAIL, not retried) and the other trials finish."""
    space = write_space(tmp_path / "nan.yaml", num_samples=3, max_concurrent_trials=2, max_failures=2,
                        sampler={"type": "grid"}, fixed={"optimizer": "sgd", "epochs": 3},
                        space={"lr": {"choice": [1.0e12, 1.0e-2, 3.0e-3]}})
    options = search_options(tmp_path, space, "nan")
    summary = runner.run_search(options)
    assert summary["complete"] and summary["counts"] == {"finished": 2, "failed": 1}
    runs = trial_runs(options.tracking_uri, "nan")
    assert len(runs) == 3 and all(r.data.tags["htnet.attempt"] == "1" for r in runs)
    [diverged] = [r for r in runs if float(r.data.params["lr"]) == 1e12]
    assert diverged.info.status == "FAILED" and diverged.data.tags["htnet.status"] == "failed"
    assert diverged.data.tags["htnet.error"].startswith("TrainingDiverged: training loss is")
    assert all(r.info.status == "FINISHED" and r.data.metrics["folds_done"] == 6 for r in runs if r is not diverged)
    states = Counter(t.state for t in optuna_trials(tmp_path / "runs", "nan"))
    assert states == {TrialState.COMPLETE: 2, TrialState.FAIL: 1}


def dataset_of(client, run_id):
    """(name, digest, source) of a run's one MLflow dataset input."""
    [given] = client.get_run(run_id).inputs.dataset_inputs
    return given.dataset.name, given.dataset.digest, given.dataset.source


def test_mlflow_server_stopped_mid_search_then_resume_fills_it_in(local_ray, tmp_path, capsys):
    """The tracking server dies while trials run: the trials go on and Ray keeps their results,
    the driver warns once when it goes, says once at its end what happened and what to do, and exits
    unfinished. After the server restarts on the same store, `resume` syncs MLflow from Ray's results:
    one finished run per trial, as many as requested, none twice, each with its data as a dataset input."""
    samples, name = 3, "outage"
    folder, port = tmp_path / "mlflow-server", free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(folder, port)
    try:
        space = write_space(tmp_path / "outage.yaml", num_samples=samples, max_concurrent_trials=2,
                            fixed={"epochs": 4})
        options = search_options(tmp_path, space, name)
        options.tracking_uri = uri

        def mid_search():
            runs = trial_runs(uri, name)
            finished = [r for r in runs if r.data.tags.get("htnet.status") == "finished"]
            running = [r for r in runs if r.info.status == "RUNNING"
                       and r.data.metrics.get("running_inner_val_uf1") is not None]
            return finished and running

        summary, stopped = run_search_and_meanwhile(options, mid_search, lambda _: stop_mlflow_server(server),
                                                    timeout=240, what="one finished and one running trial")
        assert "value" in stopped, stopped
        assert not summary["complete"] and summary["mlflow_error"]
        err = capsys.readouterr().err.splitlines()
        ray_path = summary["manifest"]["ray_path"]
        line = (f"error: MLflow tracking server at {uri} unreachable (connection refused): results are kept "
                f"in {ray_path}; restart it and run `python -m search resume {name}` to fill MLflow in")
        assert [e for e in err if e.startswith("error:")] == [line], err  # said once, at the end
        warned = [w for w in err if w.startswith("warning: MLflow")]
        assert warned == [f"warning: MLflow at {uri} stopped answering (connection refused): the trials go on "
                          f"and Ray keeps their results for it"], err

        # Ray kept every trial's results and files on disk.
        from ray import tune
        trials = tune.ExperimentAnalysis(ray_path).trials
        assert len(trials) == samples and {t.status for t in trials} == {"TERMINATED"}
        for trial in trials:
            assert trial.last_result["htnet_status"] == "finished"
            with trial.checkpoint.as_directory() as files:
                assert len(pd.read_csv(Path(files) / "predictions.csv")) > 0

        # resume while it is still down: one line, exit 1 from the CLI, nothing lost
        with pytest.raises(runner.UserError, match=f"MLflow tracking server at {uri} unreachable"):
            runner.resume_search(name, storage=tmp_path / "runs")

        server = start_mlflow_server(folder, port)  # the same store
        resumed = runner.resume_search(name, storage=tmp_path / "runs")
        assert resumed["complete"] and resumed["counts"] == {"finished": samples}
        runs = trial_runs(uri, name)
        per_trial = Counter(r.data.tags["htnet.trial_id"] for r in runs)
        assert set(per_trial) == {t.trial_id for t in trials} and set(per_trial.values()) == {1}, per_trial
        assert all(r.info.status == "FINISHED" and r.data.tags["htnet.status"] == "finished" for r in runs)
        assert all(r.data.metrics["folds_done"] == 6 for r in runs)
        assert any(r.data.tags.get("htnet.backfilled") == "true" for r in runs)
        client = MlflowClient(uri)
        digest = tracking.provenance(stores.load_data(summary["manifest"]["data"])[0])["htnet_data"]
        root = summary["manifest"]["data_root"]
        for run in [*runs, parent_run(uri, name)]:  # logged live, by the sync, and the search's own
            assert dataset_of(client, run.info.run_id) == ("synthetic", digest, f"synthetic:{root}")
        for run in runs:
            assert {"predictions.csv", "config.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "running_inner_val_uf1")]
            assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]
        assert parent_run(uri, name).info.status == "FINISHED"
    finally:
        stop_mlflow_server(server, signal.SIGTERM)


def test_a_rerun_logs_its_data_as_an_mlflow_dataset_input(local_ray, tmp_path, capsys):
    """The runs table's Dataset column: a search's trial run and a rerun's parent and seed runs each name the
    data they trained on (here the built-in synthetic set's folder) and its fingerprint."""
    space = write_space(tmp_path / "data.py", num_samples=1, max_concurrent_trials=1, fixed={"epochs": 1})
    options = search_options(tmp_path, space, "data", subjects="4")
    summary = runner.run_search(options)
    assert summary["complete"]
    root = summary["manifest"]["data_root"]
    digest = tracking.provenance(stores.load_data({"path": root})[0])["htnet_data"]
    assert cli.main(["rerun", "--best", "data", "--seeds", "1", "--data", root, "--tracking-uri",
                     options.tracking_uri, "--storage", str(tmp_path / "runs")]) == 0
    client = MlflowClient(options.tracking_uri)
    [trial] = trial_runs(options.tracking_uri, "data")
    experiment = client.get_experiment_by_name("htnet").experiment_id
    rerun_runs = [r for r in client.search_runs([experiment])
                  if r.data.tags.get("htnet.role") in ("rerun", "rerun_seed")]
    assert len(rerun_runs) == 2
    synthetic = ("synthetic", digest, f"synthetic:{root}")
    assert dataset_of(client, trial.info.run_id) == synthetic
    for run in rerun_runs:  # --data names the same folder: read as a release, the same fingerprint
        assert dataset_of(client, run.info.run_id) == synthetic
