"""Faults of the search driver, tried on purpose with real processes, a real local Ray, real MLflow
and Optuna stores and real signals; nothing mocked. Each case ends in one `error: ...` line naming
the file, flag or value (exit 2; 1 for an unfinished search), loses nothing and never hangs.

Searches here are tiny (STSTNet, 3 synthetic subjects, a few epochs, 1-2 trials, 1 CPU). Every wait
is for an event (a process's exit, MLflow states, processes gone); timeouts are safety nets only.
Each test's Ray runs under a private RAY_TMPDIR (fixture ray_tmpdir), so other Ray instances on
the machine are neither joined nor disturbed and the test sees every process of its sessions.
"""
import os
import pickle
import signal
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState
from ray import tune  # noqa: F401 - imported up front: an in-process `resume` below must be instant

from htnet.errors import UserError
from search import tracking  # noqa: F401
from search.driver import runner, stores  # noqa: F401
from search.space import load_space
from search_fixtures import (died, free_port, optuna_trials, parent_run, ray_processes, ray_tmpdir, run_main,  # noqa: F401
                             start_cli, trial_runs, wait_for_exit, wait_until, write_space)

SAFETY_NET = 1800  # seconds: only a hung process gets there
TINY = {"epochs": 2, "inner_val_subjects": 1}  # 3 subjects: one tested, two trained, one of them validates


def tiny_space(tmp_path, name="tiny", **settings):
    settings = {"num_samples": 1, "max_concurrent_trials": 1, **settings}
    return write_space(tmp_path / f"{name}.yaml", fixed={**TINY, **settings.pop("fixed", {})}, **settings)


def run_args(space, name, tmp_path, *flags):
    return ["run", str(space), "--name", name, "--storage", str(tmp_path / "runs"), "--subjects", "3",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--verbose", "0", *flags]


def cli(args, capsys):
    """`python -m search ARGS` in-process: (exit code, stdout, the error lines of stderr)."""
    code, out, err = run_main("search", args, capsys)
    assert "Traceback" not in err, err
    return code, out, [line for line in err.splitlines() if line.startswith("error:")]


def error_lines(path):
    return [line for line in Path(path).read_text().splitlines() if line.startswith("error:")]


def records(tmp_path):
    folder = tmp_path / "runs" / "searches"
    return sorted(p.name for p in folder.glob("*.yaml")) if folder.is_dir() else []


def no_study(tmp_path, name):
    with pytest.raises(KeyError):
        optuna_trials(tmp_path / "runs", name)
    return True


def all_runs(uri):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("htnet")
    return client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []


def stop(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# ----------------------------------------------------------------------------- 1. concurrent runs

def test_two_drivers_of_one_search_and_another_search_at_once_on_a_fresh_store(tmp_path, ray_tmpdir, capsys):
    """Three `search run` processes start together on a fresh MLflow store and Optuna storage: two
    with one name, one with another. The store is created once (no alembic race); of the two with
    one name exactly one runs the search and the other stops in one line (exit 2) before writing
    anything; a `resume` of it meanwhile is refused the same way; the other name finishes too."""
    space = tiny_space(tmp_path, num_samples=2)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"RAY_TMPDIR": str(ray_tmpdir)}
    names = {"a": "same", "b": "same", "c": "other"}
    processes = {key: start_cli(run_args(space, name, tmp_path, "--num-cpus", "1"), tmp_path / f"{key}.log",
                                env=env, err_path=tmp_path / f"{key}.err")
                 for key, name in names.items()}
    try:
        # the loser stops as soon as it finds the lock taken: then the winner is mid-search
        loser = wait_until(lambda: next((k for k in "ab" if processes[k].poll() is not None), None),
                           timeout=SAFETY_NET, what="one of the two drivers of 'same' to stop")
        winner = processes["b" if loser == "a" else "a"]
        assert processes[loser].returncode == 2, (tmp_path / f"{loser}.err").read_text()[-3000:]
        message = (f"error: search 'same' is running in another process (pid {winner.pid}); "
                   f"wait for it to end or pick another --name")
        assert error_lines(tmp_path / f"{loser}.err") == [message]

        tracking.client_for(uri)  # this process too opens the new store under its lock, not mid-migration

        def a_trial_of_same_is_running():
            return any(r.info.status == "RUNNING" for r in trial_runs(uri, "same"))
        wait_until(a_trial_of_same_is_running, timeout=SAFETY_NET, interval=0.2, what="a running trial of 'same'",
                   unless=died(winner, tmp_path / f"{'b' if loser == 'a' else 'a'}.err"))
        code, _, errors = cli(["resume", "same", "--storage", tmp_path / "runs"], capsys)
        assert winner.poll() is None  # the refusal below was made while the winner ran
        assert code == 2 and errors == [f"error: search 'same' is running in another process (pid {winner.pid}); "
                                        f"wait for it to end"]
        for key in ("a", "b", "c"):
            if key != loser:
                assert wait_for_exit(processes[key], SAFETY_NET, tmp_path / f"{key}.err") == 0, \
                    (tmp_path / f"{key}.err").read_text()[-3000:]
    finally:
        for process in processes.values():
            stop(process)

    for name in ("same", "other"):  # each the records of one search
        assert parent_run(uri, name).info.status == "FINISHED"
        runs = trial_runs(uri, name)
        assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}, runs
        assert [t.state for t in optuna_trials(tmp_path / "runs", name)] == [TrialState.COMPLETE] * 2
        record = yaml.safe_load((tmp_path / "runs" / "searches" / f"{name}.yaml").read_text())
        assert record["status"] == "finished"
    assert not [r for r in all_runs(uri) if r.info.status == "RUNNING"]
    assert len(all_runs(uri)) == 2 * 3


# ----------------------------------------------------------------------------- 2. stale Ray address file

def test_a_stale_ray_current_cluster_file_is_not_joined(tmp_path, ray_tmpdir, capsys):
    """A crashed local Ray left `ray_current_cluster` (in Ray's temp folder, $RAY_TMPDIR/ray/)
    naming an address where nothing listens. Without --address, `search run` starts its own local
    Ray as the README says (ray.init(address="local")) instead of hanging on the dead address;
    when it ends, nothing of that Ray is left running."""
    stale = ray_tmpdir / "ray" / "ray_current_cluster"
    stale.parent.mkdir(parents=True)
    stale.write_text(f"127.0.0.1:{free_port()}")
    code, out, errors = cli(run_args(tiny_space(tmp_path), "stale", tmp_path), capsys)
    assert code == 0 and not errors, out[-3000:]
    assert "search stale (finished): 1 finished" in out
    assert not ray_processes(ray_tmpdir)  # ray.shutdown ends its processes


# ----------------------------------------------------------------------------- 3. trials that fit no node

@pytest.mark.parametrize("flags, message", [
    (["--num-cpus", "0"], "error: python -m search run: argument --num-cpus: must be an integer >= 1, got '0' "
                          "(see python -m search run --help)"),
    (["--num-cpus", "-2"], "error: python -m search run: argument --num-cpus: must be an integer >= 1, got '-2' "
                           "(see python -m search run --help)"),
    (["--num-cpus", "1", "--cpus-per-trial", "2"],
     "error: --cpus-per-trial 2 with --num-cpus 1: a trial needs cpu=2, gpu=0, but no node of the Ray cluster "
     "has that much (the most any node has: cpu=1, gpu=0); its trials would wait forever"),
    (["--num-cpus", "1", "--gpus-per-trial", "1"],
     "error: --gpus-per-trial 1 with --num-cpus 1: a trial needs cpu=1, gpu=1, but no node of the Ray cluster "
     "has that much (the most any node has: cpu=1, gpu=0); its trials would wait forever"),
], ids=["num-cpus-0", "num-cpus-negative", "more-cpus-than-a-node", "a-gpu-where-there-is-none"])
def test_trials_that_fit_no_node_are_refused_before_anything_is_recorded(flags, message, tmp_path, ray_tmpdir,
                                                                         monkeypatch, capsys):
    """Ray would keep such trials PENDING forever. The driver checks the per-trial resources
    against the nodes of its Ray before the search record, the MLflow parent run or the Optuna
    study exist, says so in one line (exit 2) and shuts its Ray down."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU for Ray, even on a GPU machine
    code, _, errors = cli(run_args(tiny_space(tmp_path), "unfit", tmp_path, *flags), capsys)
    assert code == 2 and errors == [message]
    assert records(tmp_path) == [] and no_study(tmp_path, "unfit")
    assert not (tmp_path / "runs" / "ray" / "unfit").exists()
    assert not (tmp_path / "mlflow.db").exists() or all_runs(f"sqlite:///{tmp_path / 'mlflow.db'}") == []
    assert not ray_processes(ray_tmpdir)


# ----------------------------------------------------------------------------- 4. damaged stores and records

def record_for(tmp_path, name, tracking_uri):
    """A complete search record as `search run` writes it (no Ray or MLflow behind it)."""
    storage = tmp_path / "runs"
    space = load_space(tiny_space(tmp_path, name))
    return {"name": name, "created": "2026-01-01T00:00:00", "status": "finished", "space_file": space.source,
            "settings": {k: getattr(space, k) for k in stores.SETTINGS_KEYS},
            "sets": [], "overrides": {}, "data": {"path": str(tmp_path / "data")}, "data_root": str(tmp_path / "data"),
            "tracking_uri": tracking_uri, "experiment": "htnet", "experiment_id": "1", "parent_run_id": "0" * 32,
            "optuna_storage": f"sqlite:///{storage / 'optuna.db'}", "ray_storage": str(storage / "ray"),
            "ray_path": str(storage / "ray" / name), "address": None}


def test_a_damaged_mlflow_store_or_search_record_is_one_line_naming_the_file(tmp_path, capsys):
    """mlflow.db overwritten with garbage: `search run` and `search status NAME` say so in one line
    naming the file, before any record is written, and leave the file as it was. Damaged search
    records (not YAML, binary, a key missing): `status NAME`/`resume NAME` name the file and what is
    wrong; `status` lists the other searches and marks the damaged ones on their line."""
    db = tmp_path / "mlflow.db"
    garbage = os.urandom(4096)
    db.write_bytes(garbage)
    uri = f"sqlite:///{db}"
    store_line = (f"error: MLflow store {db}: not a usable MLflow database (file is not a database); "
                  f"move it away or pass another --tracking-uri")
    code, _, errors = cli(run_args(tiny_space(tmp_path), "s", tmp_path), capsys)
    assert code == 2 and errors == [store_line]
    assert records(tmp_path) == [] and db.read_bytes() == garbage

    folder = tmp_path / "runs" / "searches"
    stores.write_manifest(tmp_path / "runs", "good", record_for(tmp_path, "good", uri))
    code, _, errors = cli(["status", "good", "--storage", tmp_path / "runs"], capsys)
    assert code == 2 and errors == [store_line] and db.read_bytes() == garbage

    (folder / "not-yaml.yaml").write_text("name: [unclosed\n")
    (folder / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    missing = record_for(tmp_path, "missing-key", uri)
    del missing["parent_run_id"]
    stores.write_manifest(tmp_path / "runs", "missing-key", missing)
    damaged = {name: (folder / f"{name}.yaml").read_bytes() for name in ("not-yaml", "binary", "missing-key")}
    reasons = {"not-yaml": f"{folder / 'not-yaml.yaml'}: line 2: not valid YAML",
               "binary": f"{folder / 'binary.yaml'}: not UTF-8 text (byte 0x89 at offset 0)",
               "missing-key": f"{folder / 'missing-key.yaml'}: damaged search record: key 'parent_run_id' is missing"}

    code, out, errors = cli(["status", "--storage", tmp_path / "runs"], capsys)
    assert code == 2 and errors == [f"error: {folder}: damaged search record(s): binary.yaml, missing-key.yaml, "
                                    f"not-yaml.yaml (the others are listed)"]
    lines = out.splitlines()
    assert len(lines) == 4 and lines[1].startswith("good: finished, started 2026-01-01T00:00:00, 1 trials of")
    for name, reason in reasons.items():
        [line] = [line for line in lines if line.startswith(f"{name}: ")]
        assert line.startswith(f"{name}: DAMAGED: {reason}"), line
    for command in ("status", "resume"):
        for name, reason in reasons.items():
            code, _, errors = cli([command, name, "--storage", tmp_path / "runs"], capsys)
            assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: {reason}"), (command, errors)
    assert {name: (folder / f"{name}.yaml").read_bytes() for name in damaged} == damaged  # nothing touched


# ----------------------------------------------------------------------------- 5. Ray ends with the driver

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_no_ray_process_outlives_the_driver(sig, tmp_path, ray_tmpdir):
    """While a trial runs, the driver gets SIGKILL (nothing runs in it: Ray's own fate-sharing ends
    the session's raylet, GCS, agents and workers) or SIGTERM (handled like Ctrl+C: the trials stop,
    the search is recorded unfinished, exit 1). Either way no process of that Ray session is left
    well before a minute."""
    space = tiny_space(tmp_path, fixed={"epochs": 400})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = tmp_path / "driver.log"
    driver = start_cli(run_args(space, "killed", tmp_path, "--num-cpus", "1"), log, env={"RAY_TMPDIR": str(ray_tmpdir)})
    try:
        def trial_running():
            return any(r.info.status == "RUNNING" and r.data.metrics.get("running_inner_val_uf1") is not None
                       for r in trial_runs(uri, "killed"))
        wait_until(trial_running, timeout=SAFETY_NET, interval=0.3, what="a running trial", unless=died(driver, log))
        commands = {}
        for pid in ray_processes(ray_tmpdir):
            try:
                commands[pid] = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                pass  # ended meanwhile
        assert any(b"raylet" in c for c in commands.values()) and any(b"ray::" in c for c in commands.values())
        sent = time.monotonic()
        os.kill(driver.pid, sig)
        code = wait_for_exit(driver, SAFETY_NET, log)
        exited = time.monotonic()
        wait_until(lambda: not ray_processes(ray_tmpdir), timeout=SAFETY_NET, interval=0.2,
                   what="the Ray session's processes to end")
        gone = time.monotonic()
    finally:
        stop(driver)
    # SIGKILL: Ray alone cleans up, from the kill; SIGTERM: before the driver exits
    took = gone - (sent if sig == signal.SIGKILL else exited)
    assert took < 30, took
    record = yaml.safe_load((tmp_path / "runs" / "searches" / "killed.yaml").read_text())
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL and record["status"] == "running"  # `search resume` goes on from there
    else:
        output = log.read_text()
        assert code == 1, output[-3000:]
        assert "the search did not finish: resume it with `python -m search resume killed`" in output
        assert record["status"] == "interrupted"
        assert parent_run(uri, "killed").info.status == "KILLED"
        assert not [r for r in trial_runs(uri, "killed") if r.info.status == "RUNNING"]


# ----------------------------------------------------------------------------- 6. what resume unpickles

class Payload:
    """Unpickling this creates the marker file: what a planted tuner.pkl could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def planted_experiment(tmp_path, name="planted"):
    """A search record and a Ray experiment whose tuner.pkl runs code when unpickled."""
    storage, marker = tmp_path / "runs", tmp_path / "UNPICKLED"
    record = record_for(tmp_path, name, f"sqlite:///{tmp_path / 'mlflow.db'}")
    record["status"] = "running"
    stores.write_manifest(storage, name, record)
    folder = storage / "ray" / name
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(pickle.dumps(Payload(marker)))
    (folder / "experiment_state-2026-01-01.json").write_text("{}")
    return storage, folder, marker


def test_resume_refuses_a_ray_experiment_that_others_could_have_written(tmp_path, capsys):
    """Tuner.restore unpickles tuner.pkl: who can write it runs code as you. Before any of it is
    loaded, `resume` refuses (one line, exit 2) an experiment folder, a file in it or a folder down
    from the Ray storage that others may write or that another user owns, and an experiment the
    record places outside its Ray storage; the planted pickle never runs."""
    storage, folder, marker = planted_experiment(tmp_path)
    refused = f"error: search 'planted': refusing to load the Ray experiment {folder}: "
    advice = (f"; resuming unpickles these files, so whoever can write them could run code as you "
              f"(if you trust them, chown them to you and chmod -R go-w {folder})")

    def resume():
        code, _, errors = cli(["resume", "planted", "--storage", storage], capsys)
        assert code == 2 and len(errors) == 1, errors
        assert not marker.exists()
        return errors[0]

    folder.chmod(0o757)  # o+w on the experiment folder
    assert resume() == f"{refused}{folder} is writable by others than you (mode drwxr-xrwx){advice}"
    folder.chmod(0o755)
    if os.geteuid() == 0:  # g+w for a group others are in (only root can give a folder away)
        os.chown(folder.parent, -1, 12345)
        (folder.parent).chmod(0o775)
        assert resume() == f"{refused}{folder.parent} is writable by others than you (mode drwxrwxr-x){advice}"
        os.chown(folder.parent, -1, os.getegid())
        folder.parent.chmod(0o755)
    (folder / "tuner.pkl").chmod(0o666)
    assert resume() == f"{refused}{folder / 'tuner.pkl'} is writable by others than you (mode -rw-rw-rw-){advice}"
    (folder / "tuner.pkl").chmod(0o644)
    if os.geteuid() == 0:  # only root can give a file away
        os.chown(folder / "tuner.pkl", 12345, -1)
        assert resume() == f"{refused}{folder / 'tuner.pkl'} is owned by uid 12345, not by you (uid 0){advice}"
        os.chown(folder / "tuner.pkl", 0, -1)

    record = yaml.safe_load((storage / "searches" / "planted.yaml").read_text())
    elsewhere = tmp_path / "elsewhere" / "planted"
    elsewhere.parent.mkdir()
    for ray_path, why in ((str(elsewhere), f"its record names the Ray experiment {elsewhere}, not "
                                           f"{storage / 'ray'}/planted: refusing to load it"),):
        stores.write_manifest(storage, "planted", {**record, "ray_path": ray_path})
        assert resume() == f"error: search 'planted': {why}"
    folder.rename(elsewhere)  # the experiment folder is a link out of the Ray storage
    folder.symlink_to(elsewhere)
    stores.write_manifest(storage, "planted", record)
    assert resume() == (f"error: search 'planted': the Ray experiment {folder} leads outside the Ray storage "
                        f"{storage / 'ray'} (a symbolic link?): refusing to load it")

    with open(elsewhere / "tuner.pkl", "rb") as f:  # the payload is real: loading it would have run it
        pickle.load(f)
    assert marker.exists()


def test_resume_accepts_group_write_for_your_own_private_group(tmp_path):
    """umask 002 (many distributions' default) makes Ray's files group-writable; where the group is
    your user-private group nobody else can write them, so the experiment is accepted."""
    if not stores.private_group(os.getegid()):
        pytest.skip("this user's primary group is not a user-private group")
    storage, folder, marker = planted_experiment(tmp_path)
    for item in (folder.parent, folder, folder / "tuner.pkl"):
        item.chmod(0o775)
    record = yaml.safe_load((storage / "searches" / "planted.yaml").read_text())
    stores.check_restorable(record, "planted")  # no error
    (folder / "tuner.pkl").chmod(0o777)
    with pytest.raises(UserError, match="is writable by others than you"):
        stores.check_restorable(record, "planted")
    assert not marker.exists()
