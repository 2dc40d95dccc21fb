"""The cluster path simulated on one machine (cluster-local.yaml, `python -m search local-cluster`): Ray's
autoscaler adds fake GPU workers for pending trials and removes idle ones, Ray Tune's results and MLflow's
artifacts live in an S3 server (moto) on 127.0.0.1, and a search survives a spot reclaim (a worker's raylet
killed mid-trial), its driver's death and an S3 outage (tests/tooling/switchable_proxy.py in front of the S3
server, switched off and on). The measured figures go to benchmarks/RESULTS.md (printed: -s)."""
import collections
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import search_fixtures
from search_fixtures import (REPO, died, free_port, kill_session, optuna_trials, ray_processes, run_cli, start_cli,
                             wait_for_exit, wait_until, write_space)

pytestmark = pytest.mark.slow
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local-test", "AWS_SECRET_ACCESS_KEY": "local-test-secret"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The local cluster, its S3 endpoint a switchable proxy in front of an S3 server that this fixture starts."""
    folder, s3_folder = tmp_path_factory.mktemp("local-cluster"), tmp_path_factory.mktemp("s3")
    env = {**os.environ, **CREDENTIALS}
    s3_port, proxy_port = free_port(), free_port()
    with open(s3_folder / "s3.log", "wb") as log:
        s3 = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    proxy = subprocess.Popen([sys.executable, "-I", str(REPO / "tests" / "tooling" / "switchable_proxy.py"),
                              str(proxy_port), str(s3_port)])
    try:
        started = subprocess.run([sys.executable, "-m", "search", "local-cluster", "start", "--dir", str(folder),
                                  "--idle-timeout-minutes", "0.25", "--s3-endpoint", f"http://127.0.0.1:{proxy_port}"],
                                 cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert started.returncode == 0, started.stderr
        exports = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines())
        try:
            yield {"folder": folder, "env": {**env, **exports}, "proxy": proxy, "proxy_port": proxy_port, **exports}
        finally:
            temp = json.loads((folder / "cluster.json").read_text())["ray_temp_dir"]
            stopped = subprocess.run([sys.executable, "-m", "search", "local-cluster", "stop", "--dir", str(folder)],
                                     cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
            assert stopped.returncode == 0, stopped.stderr
            assert not ray_processes(temp) and not ray_processes(folder)  # head, workers, MLflow: gone
    finally:
        for process in (proxy, s3):
            process.terminate()
            process.wait()


def switch_s3(cluster, up):
    """The S3 endpoint down (connections cut and refused, as in an outage) or up again; the contents are kept."""
    os.kill(cluster["proxy"].pid, signal.SIGUSR2 if up else signal.SIGUSR1)

    def answers():
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", cluster["proxy_port"]), timeout=2):
            return True
        return False
    wait_until(lambda: answers() == up, timeout=30, interval=0.1, what=f"the S3 proxy {'up' if up else 'down'}")


def s3_keys(cluster, prefix):
    import boto3

    s3 = boto3.client("s3", endpoint_url=cluster["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="htnet", Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def snapshot_names_a_checkpoint(cluster, prefix):
    import boto3

    s3 = boto3.client("s3", endpoint_url=cluster["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    states = [k for k in s3_keys(cluster, prefix) if k.rpartition("/")[2].startswith("experiment_state")]
    return any(b"checkpoint_0000" in s3.get_object(Bucket="htnet", Key=k)["Body"].read() for k in states)


def trial_runs(cluster, name):
    return search_fixtures.trial_runs(cluster["MLFLOW_TRACKING_URI"], name)


def ray_nodes(cluster):
    """(node id, alive, GPUs) of every node the cluster has had, asked from a fresh driver."""
    code = ("import json, ray; ray.init(address='{0}', log_to_driver=False); print(json.dumps([(n['NodeID'], "
            "n['Alive'], n['Resources'].get('GPU', 0)) for n in ray.nodes()]))").format(cluster["RAY_ADDRESS"])
    out = subprocess.run([sys.executable, "-c", code], env=cluster["env"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def search_args(cluster, space, name, storage):
    return ["run", str(space), "--name", name, "--storage", str(storage), "--address", cluster["RAY_ADDRESS"],
            "--ray-storage", cluster["HTNET_RAY_STORAGE"], "--tracking-uri", cluster["MLFLOW_TRACKING_URI"],
            "--gpus-per-trial", "0.5", "--cpus-per-trial", "1"]


def kill_node(node_id):
    """A spot reclaim: the node's raylet and every process under it (its workers, agents) die at once."""
    found = subprocess.run(["pgrep", "-f", f"raylet.*--node_id={node_id}"], capture_output=True, text=True)
    assert found.stdout.split(), f"no raylet of node {node_id}"
    return kill_tree([int(p) for p in found.stdout.split()])


def kill_tree(queue):
    pids = []
    while queue:
        pids.append(pid := queue.pop())
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        queue += [int(c) for c in children]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def raylet_running(task):
    """The pid of the raylet whose worker runs `task` (Ray titles a busy worker ray::<task>), or None."""
    for pid in subprocess.run(["pgrep", "-f", f"^ray::{task}"], capture_output=True, text=True).stdout.split():
        with contextlib.suppress(OSError):
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if b"raylet" in Path(f"/proc/{parent}/cmdline").read_bytes():
                return parent
    return None


def clock_of(log, pattern):
    """The seconds on the search console's clock ([h:mm:ss]) of the first line that matches `pattern`."""
    h, m, sec = re.search(r"\[(\d+):(\d\d):(\d\d)\] " + pattern, log.read_text()).groups()
    return int(h) * 3600 + int(m) * 60 + int(sec)


def test_a_search_autoscales_onto_gpu_workers_and_idle_workers_are_removed(cluster, tmp_path):
    space = write_space(tmp_path / "space.yaml", num_samples=4, max_concurrent_trials=4, max_failures=2,
                        fixed={"epochs": 20})
    before = {n[0] for n in ray_nodes(cluster)}
    started = time.monotonic()
    search = start_cli(search_args(cluster, space, "autoscale", tmp_path / "runs"), tmp_path / "search.log",
                       env=cluster["env"])
    # the workers' resources, read while they are alive (a removed node's are gone)
    alive = wait_until(lambda: {n[0]: n[2] for n in ray_nodes(cluster) if n[0] not in before and n[1]}, timeout=300,
                       interval=5, what="a worker node", unless=died(search, tmp_path / "search.log"))
    assert wait_for_exit(search, 600, tmp_path / "search.log") == 0, (tmp_path / "search.log").read_text()[-3000:]
    # the progress clock starts with the Tuner, its trials pending; a trial starts once a worker has joined
    first = clock_of(tmp_path / "search.log", r"trial #\d+ started")
    print(f"\nautoscaling: a trial pending {first:.0f} s, from the Tuner's start until it ran on a new worker")

    runs = trial_runs(cluster, "autoscale")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    workers = {n[0]: n[2] for n in ray_nodes(cluster) if n[0] not in before}
    on = collections.Counter(r.data.tags["htnet.node_id"] for r in runs)
    assert set(on) <= set(workers), (on, workers)   # every trial on a worker the autoscaler added
    assert len(workers) == 2, workers   # as the demand asked: 4 trials at 0.5 GPU, one GPU per worker
    assert set(alive) <= set(workers) and set(alive.values()) == {1}, alive   # the workers of cluster-local.yaml
    for run in runs:   # the trials' artifacts went through the MLflow server into S3
        keys = s3_keys(cluster, f"mlartifacts/{run.info.experiment_id}/{run.info.run_id}/")
        assert any(k.endswith("predictions.csv") for k in keys), keys
    ray_keys = s3_keys(cluster, "ray/autoscale/")
    assert any(k.endswith("experiment_state.json") or "experiment_state" in k for k in ray_keys)
    assert sum("checkpoint_" in k for k in ray_keys) >= 4
    states = collections.Counter(t.state.name for t in optuna_trials(tmp_path / "runs", "autoscale"))
    assert states == {"COMPLETE": 4}

    # idle workers go (idle timeout 0.25 min here, 10 min in cluster.yaml)
    wait_until(lambda: not any(alive for node, alive, _ in ray_nodes(cluster) if node in workers), timeout=240,
               interval=5, what="the idle workers to be removed")
    print(f"idle workers removed {time.monotonic() - started:.0f} s after the search started")


def test_a_spot_reclaim_mid_trial_resumes_from_the_s3_fold_checkpoint(cluster, tmp_path):
    space = write_space(tmp_path / "space.yaml", num_samples=2, max_concurrent_trials=2, max_failures=2,
                        fixed={"epochs": 400})
    search = start_cli(search_args(cluster, space, "reclaim", tmp_path / "runs"), tmp_path / "search.log",
                       env=cluster["env"])

    def checkpointed():  # a trial with a fold checkpoint in S3, and its node
        keys = s3_keys(cluster, "ray/reclaim/")
        done = {k.split("/")[2] for k in keys if "/checkpoint_" in k}
        return next(((r.data.tags["htnet.trial_id"], r.data.tags["htnet.node_id"])
                     for r in trial_runs(cluster, "reclaim")
                     if r.data.tags.get("htnet.node_id") and any(r.data.tags["htnet.trial_id"] in d for d in done)),
                    None)

    trial, node = wait_until(checkpointed, timeout=300, what="a fold checkpoint in S3",
                             unless=died(search, tmp_path / "search.log"))
    kill_node(node)
    killed = time.monotonic()
    wait_until(lambda: "restarted" in (tmp_path / "search.log").read_text(), timeout=300,
               what="the trial to restart elsewhere", unless=died(search, tmp_path / "search.log"))
    restarted = time.monotonic() - killed
    assert wait_for_exit(search, 900, tmp_path / "search.log") == 0, (tmp_path / "search.log").read_text()[-3000:]

    attempts = trial_runs(cluster, "reclaim")
    runs = {r.data.tags["htnet.trial_id"]: r for r in attempts if r.info.status == "FINISHED"}
    lost = [r for r in attempts if r.info.status != "FINISHED"]
    assert len(runs) == 2 and len(attempts) == 2 + len(lost)           # one finished run per trial
    assert lost and all(r.data.tags.get("htnet.retried") == "true" for r in lost)  # the lost attempts, marked
    states = collections.Counter(t.state.name for t in optuna_trials(tmp_path / "runs", "reclaim"))
    assert states == {"COMPLETE": 2}                                   # none counted twice in Optuna
    metrics = runs[trial].data.metrics
    assert runs[trial].data.tags["htnet.node_id"] != node              # retried on another node
    assert metrics["fold_epochs_resumed"] > 0                          # from its fold checkpoint, not fold 1
    retrained = metrics["fold_epochs_trained"] - metrics["fold_epochs"]
    assert 0 < metrics["fold_epochs_resumed"] < metrics["fold_epochs"]   # lost mid-trial
    assert 0 <= retrained < metrics["fold_epochs"] - metrics["fold_epochs_resumed"]  # only what was in flight
    assert metrics["folds_done"] == 6
    print(f"\nnode loss: trial {trial} restarted on another node {restarted:.0f} s after its node was killed; it "
          f"resumed {metrics['fold_epochs_resumed']:.0f} of {metrics['fold_epochs']:.0f} fold-epochs from S3, "
          f"retrained {retrained:.0f} finished ones and lost the fold in flight (at most "
          f"{metrics['fold_epochs'] / metrics['folds_done']:.0f} fold-epochs); the search ended "
          f"{time.monotonic() - killed:.0f} s after the kill")
    checkpoints = collections.defaultdict(list)   # ray/<search>/<trial>/checkpoint_N/<file>: bytes
    for key, size in s3_keys(cluster, "ray/reclaim/").items():
        if "/checkpoint_" in key:
            checkpoints[key.split("/checkpoint_")[0] + key.split("/checkpoint_")[1].split("/")[0]].append(size)
    sizes = [sum(files) for files in checkpoints.values()]
    print(f"storage: {len(sizes)} checkpoints kept in S3, {sum(sizes) / len(sizes) / 1e3:.0f} kB and "
          f"{sum(map(len, checkpoints.values())) / len(sizes):.0f} objects each on average, at most "
          f"{max(sizes) / 1e3:.0f} kB")


def test_a_killed_driver_resumes_from_the_s3_storage_in_a_fresh_process(cluster, tmp_path):
    space = write_space(tmp_path / "space.yaml", num_samples=2, max_concurrent_trials=2, max_failures=1,
                        fixed={"epochs": 400})
    driver = start_cli(search_args(cluster, space, "driver", tmp_path / "runs"), tmp_path / "search.log",
                       env=cluster["env"])
    # killed once Ray's snapshot in S3 names a fold checkpoint (before that, a resumed trial starts again)
    wait_until(lambda: snapshot_names_a_checkpoint(cluster, "ray/driver/"), timeout=300,
               what="a snapshot naming a fold checkpoint", unless=died(driver, tmp_path / "search.log"))
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    kill_session(driver)

    switch_s3(cluster, up=False)   # resumed while S3 does not answer: one line, nothing changed
    try:
        refused = run_cli(["resume", "driver", "--storage", str(tmp_path / "runs")], env=cluster["env"])
    finally:
        switch_s3(cluster, up=True)
    assert refused.returncode == 2 and refused.stderr.startswith(
        "error: Ray storage s3://htnet/ray does not answer"), refused.stderr[-2000:]
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr

    resumed = start_cli(["resume", "driver", "--storage", str(tmp_path / "runs")], tmp_path / "resume.log",
                        env=cluster["env"])
    assert wait_for_exit(resumed, 900, tmp_path / "resume.log") == 0, (tmp_path / "resume.log").read_text()[-3000:]
    log = (tmp_path / "resume.log").read_text()
    assert "resuming search driver from s3://htnet/ray/driver" in log
    runs = trial_runs(cluster, "driver")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert sum(r.data.metrics["fold_epochs_resumed"] for r in runs) > 0   # went on from S3, not from scratch
    states = collections.Counter(t.state.name for t in optuna_trials(tmp_path / "runs", "driver"))
    assert states == {"COMPLETE": 2}


def test_an_s3_outage_mid_search_is_said_once_and_the_search_finishes_when_it_is_back(cluster, tmp_path):
    space = write_space(tmp_path / "space.yaml", num_samples=2, max_concurrent_trials=2, max_failures=1,
                        fixed={"epochs": 400})
    log = tmp_path / "search.log"
    search = start_cli(search_args(cluster, space, "outage", tmp_path / "runs"), log, env=cluster["env"])
    wait_until(lambda: any("/checkpoint_" in k for k in s3_keys(cluster, "ray/outage/")), timeout=300,
               what="a fold checkpoint in S3", unless=died(search, log))
    switch_s3(cluster, up=False)
    down = time.monotonic()
    try:
        wait_until(lambda: "could not store its checkpoint" in log.read_text(), timeout=180,
                   what="the line that says the storage does not answer", unless=died(search, log))
        said = time.monotonic() - down
        time.sleep(20)   # down a while: more reports go without their checkpoint
    finally:
        switch_s3(cluster, up=True)
    up = time.monotonic()
    assert wait_for_exit(search, 900, log) == 0, log.read_text()[-3000:]
    output = log.read_text()
    assert output.count("could not store its checkpoint") == 1, output[-3000:]   # one line, not one per report
    assert "Ray's storage answers again" in output

    runs = trial_runs(cluster, "outage")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)     # no attempt lost, none retried
    for run in runs:
        metrics = run.data.metrics
        assert metrics["folds_done"] == 6 and "htnet.artifacts_error" not in run.data.tags
        # the trials trained on through the outage: every fold-epoch once, by the one attempt
        assert metrics["fold_epochs_attempt"] == metrics["fold_epochs_trained"] == metrics["fold_epochs"]
        keys = s3_keys(cluster, f"mlartifacts/{run.info.experiment_id}/{run.info.run_id}/")
        assert any(k.endswith("predictions.csv") for k in keys), keys
    states = collections.Counter(t.state.name for t in optuna_trials(tmp_path / "runs", "outage"))
    assert states == {"COMPLETE": 2}
    print(f"\nS3 outage: said {said:.1f} s after it began; down {up - down:.0f} s; the search ended "
          f"{time.monotonic() - up:.0f} s after S3 was back")


def test_files_mlflow_cannot_store_while_s3_is_down_are_tagged_not_taken_for_mlflow_down(cluster, tmp_path,
                                                                                         monkeypatch):
    from ray import tune

    from search.tracking.store import HTTP_DEFAULTS, client_for
    from search.tracking.writer import log_trial_files

    for key, value in HTTP_DEFAULTS.items():   # the driver's short HTTP retries
        monkeypatch.setenv(key, value)
    client = client_for(cluster["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("htnet") or client.get_experiment_by_name("Default")
    run_id = client.create_run(experiment.experiment_id).info.run_id
    files = tmp_path / "trial"
    (files / "folds").mkdir(parents=True)
    (files / "predictions.csv").write_text("sample,label,prediction\ns01_a,0,0\n")
    (files / "folds" / "s01.json").write_text("{}")
    checkpoint = tune.Checkpoint.from_directory(files)

    switch_s3(cluster, up=False)
    try:
        why = log_trial_files(client, run_id, "t1", checkpoint)   # returns: MLflow answers, its S3 does not
    finally:
        switch_s3(cluster, up=True)
    assert why and client.get_run(run_id).data.tags["htnet.artifacts_error"] == why
    assert log_trial_files(client, run_id, "t1", checkpoint) is None
    keys = s3_keys(cluster, f"mlartifacts/{experiment.experiment_id}/{run_id}/")
    assert any(k.endswith("predictions.csv") for k in keys) and not any("/folds/" in k for k in keys), keys


def test_s3_storage_that_does_not_answer_or_lacks_its_bucket_is_one_line_before_anything_is_recorded(cluster,
                                                                                                    tmp_path):
    space = write_space(tmp_path / "space.yaml", num_samples=1, fixed={"epochs": 1})
    missing = search_args(cluster, space, "nobucket", tmp_path / "runs")
    missing[missing.index("--ray-storage") + 1] = "s3://no-such-bucket/ray"
    done = run_cli(missing, env=cluster["env"])
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == ("error: Ray storage s3://no-such-bucket/ray: there is no bucket "
                                                    "'no-such-bucket'; create it first")

    switch_s3(cluster, up=False)
    try:
        done = run_cli(search_args(cluster, space, "nos3", tmp_path / "runs"), env=cluster["env"])
    finally:
        switch_s3(cluster, up=True)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: Ray storage s3://htnet/ray does not answer (")
    done = run_cli(["rerun", "--preset", "ststnet", "--seeds", "1", "--method", "nobucket", "--storage",
                    str(tmp_path / "runs"), "--ray-storage", "s3://no-such-bucket/reruns",
                    "--tracking-uri", cluster["MLFLOW_TRACKING_URI"]], env=cluster["env"])
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        "error: --ray-storage s3://no-such-bucket/reruns: there is no bucket 'no-such-bucket'; create it first")

    client = search_fixtures.store_client(cluster["MLFLOW_TRACKING_URI"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments, filter_string="tags.`htnet.method` = 'nobucket'") == []
    for name in ("nobucket", "nos3"):   # no search record, no MLflow run (parent or trial)
        assert not (tmp_path / "runs" / "searches" / f"{name}.yaml").exists()
        assert client.search_runs(experiments, filter_string=f"tags.`htnet.search` = '{name}'") == []


@pytest.mark.skip(reason="open (issue 26, reruns as Tune trials): after its node is killed, the rerun's Tune trial "
                         "stays PENDING ('cluster only has 0 CPUs and 0 GPUs available') instead of the autoscaler "
                         "adding a worker, as it does for a search trial (test_a_spot_reclaim_mid_trial_...)")
def test_a_rerun_seed_on_a_reclaimed_node_goes_on_from_its_folds_in_s3(cluster, tmp_path):
    log = tmp_path / "rerun.log"
    rerun = start_cli(["rerun", "--preset", "ststnet", "--seed-list", "1", "--method", "reclaimed", "--set",
                       "epochs=300", "--storage", str(tmp_path / "runs"), "--address", cluster["RAY_ADDRESS"],
                       "--ray-storage", "s3://htnet/reruns", "--gpus-per-seed", "0.5",
                       "--tracking-uri", cluster["MLFLOW_TRACKING_URI"]], log, env=cluster["env"])
    wait_until(lambda: any("/folds/" in k for k in s3_keys(cluster, "reruns/")), timeout=300,
               what="a seed's finished fold in S3", unless=died(rerun, log))
    kill_tree([wait_until(lambda: raylet_running("ImplicitFunc"), timeout=60, what="the seed's node")])  # its trial
    assert wait_for_exit(rerun, 900, log) == 0, log.read_text()[-3000:]

    client = search_fixtures.store_client(cluster["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("htnet").experiment_id
    [seed] = client.search_runs([experiment], "tags.`htnet.role` = 'rerun_seed' and tags.`htnet.method` = 'reclaimed'")
    assert seed.data.tags["htnet.status"] == "finished", seed.data.tags
    metrics = seed.data.metrics
    assert metrics["fold_epochs_resumed"] > 0   # the retried trial went on from its checkpoint in S3
    print(f"\nrerun seed on a reclaimed node: resumed {metrics['fold_epochs_resumed']:.0f} of "
          f"{metrics['fold_epochs']:.0f} fold-epochs from S3")
    left = s3_keys(cluster, "reruns/")
    assert not any("/seed-" in key for key in left), left   # MLflow has the result: the seed's trial is gone
