"""Helpers and fixtures of the search tests (real Ray, Optuna and MLflow; nothing mocked)."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# STSTNet for 2 epochs on 6 synthetic subjects: a LOSO trial takes a few seconds on one core.
TINY_FIXED = {"model": "ststnet", "epochs": 2, "batch_size": 32, "inner_val_subjects": 2,
              "protocols": ["paper", "final", "inner"], "device": "cpu", "report_every": 1}


def write_space(path, fixed=None, space=None, **settings):
    """A small search space file, NAME.py beside `path` (returned): `space` describes its parameters, e.g.
    {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "batch_size": {"choice": [16, 32]}}, each one suggestion;
    keyword arguments replace settings (a grid sampler gets the choices as its grid)."""
    space = space or {"lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
                      "batch_size": {"choice": [16, 32]}}
    fixed = {k: v for k, v in {**TINY_FIXED, **(fixed or {})}.items() if k not in space}
    content = {"num_samples": 2, "max_concurrent_trials": 2, "objective": "inner",
               "resources": {"cpu": 1, "gpu": 0}, "max_failures": 0,
               "sampler": {"type": "random", "seed": 0}, "pruner": {"type": "none"},
               "data": {"synthetic_subjects": 2, "synthetic_seed": 0}, "fixed": fixed}
    content.update(settings)
    if content["sampler"]["type"] == "grid":
        content.setdefault("grid", {name: spec["choice"] for name, spec in space.items()})
    lines = [f"{key} = {value!r}" for key, value in content.items()]
    lines += ["", "", "def space(trial):", "    return {"]
    lines += [f"        {name!r}: {suggestion(name, spec)}," for name, spec in space.items()] + ["    }", ""]
    path = Path(path).with_suffix(".py")
    path.write_text("\n".join(lines))
    return path


def suggestion(name, spec):
    """The Optuna call for one parameter of write_space."""
    if "choice" in spec:
        return f"trial.suggest_categorical({name!r}, {spec['choice']!r})"
    kind = "int" if isinstance(spec["low"], int) and isinstance(spec["high"], int) else "float"
    return f"trial.suggest_{kind}({name!r}, {spec['low']!r}, {spec['high']!r}, log={bool(spec.get('log'))})"


def search_options(tmp_path, space_path, name, **kwargs):
    from search.driver.runner import Options

    return Options(space=str(space_path), name=name, storage=str(tmp_path / "runs"),
                   tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", verbose=0, **kwargs)


def trial_runs(tracking_uri, name):
    """The MLflow child runs of search `name`, all attempts."""
    client = store_client(tracking_uri)
    experiment = client.get_experiment_by_name("htnet")
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`htnet.search` = '{name}' and tags.`htnet.role` = 'trial'",
                              max_results=1000)


def store_client(tracking_uri):
    """A client opened as the driver opens the store: a new sqlite file is created under the
    driver's lock, so polling it while the driver migrates it is not an alembic race."""
    from search import tracking

    return tracking.client_for(tracking_uri)


def parent_run(tracking_uri, name):
    client = store_client(tracking_uri)
    experiment = client.get_experiment_by_name("htnet")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`htnet.search` = '{name}' and tags.`htnet.role` = 'search'")
    assert len(runs) == 1, runs
    return runs[0]


def optuna_trials(storage_dir, name, url=None):
    """The Optuna trials of search `name` (default store: <storage>/optuna.db)."""
    import optuna

    from search.driver.stores import open_optuna_storage

    url = url or f"sqlite:///{Path(storage_dir) / 'optuna.db'}"
    study = optuna.load_study(study_name=name, storage=open_optuna_storage(url))
    return study.get_trials(deepcopy=False)


def wait_until(condition, timeout, interval=0.5, what="condition", unless=None):
    """Poll `condition` until it gives a true value (returned). `timeout` is a safety net, not a
    guess of how long it takes; `unless()` giving a text (e.g. the process we wait on died, with
    its log) ends the wait at once with that text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        reason = unless() if unless else None
        if reason:
            raise AssertionError(f"gave up waiting for {what}: {reason}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def died(process, log_path):
    """For wait_until(unless=...): the process's exit and the end of its log once it ended."""
    def check():
        if process.poll() is None:
            return None
        text = Path(log_path).read_text(errors="replace") if Path(log_path).exists() else ""
        return f"the process exited with {process.returncode}:\n{text[-3000:]}"
    return check


def wait_for_exit(process, timeout, log_path=None):
    """The process's exit code; a process still running after `timeout` (a safety net) fails the test."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        text = Path(log_path).read_text(errors="replace")[-3000:] if log_path and Path(log_path).exists() else ""
        raise AssertionError(f"still running after {timeout} s:\n{text}") from None



def run_search_and_meanwhile(options, ready, act, timeout, what):
    """Run the search; meanwhile, from a watcher thread, wait until `ready()` gives a value and call
    `act(value)`. Returns (summary, outcome): outcome["value"] once acted, else outcome["error"]."""
    import threading

    from search.driver import runner

    outcome = {}

    def watch():
        try:
            value = wait_until(ready, timeout=timeout, interval=0.2, what=what)
            act(value)
            outcome["value"] = value
        except Exception as e:  # noqa: BLE001 - reported by the caller's assertion
            outcome["error"] = repr(e)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    summary = runner.run_search(options)
    watcher.join(timeout=30)
    return summary, outcome


def launch_mlflow_server(folder, port):
    """A real `mlflow server` on 127.0.0.1:port over a sqlite store in `folder`, its own process
    group (so a test stops only what it started); not waited for: see wait_for_mlflow_server."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "server.log", "a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
             "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_mlflow_server(server, port, folder, timeout=120):
    def healthy():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return server.poll() is not None  # ends the wait if the server died
    wait_until(healthy, timeout=timeout, what="mlflow server")
    assert server.poll() is None, (folder / "server.log").read_text()


def start_mlflow_server(folder, port):
    server = launch_mlflow_server(folder, port)
    wait_for_mlflow_server(server, port, folder)
    return server


def stop_mlflow_server(server, sig=signal.SIGKILL):
    """Only the server this test started: its own process group."""
    if server.poll() is None:
        os.killpg(server.pid, sig)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args, cwd=REPO, timeout=300, **kwargs):
    """`python -m search ...` in a subprocess; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "search", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def start_cli(args, log_path, cwd=REPO, env=None, err_path=None):
    """`python -m search ...` in its own session (process group), output to `log_path` (stderr
    to `err_path` when given); `env` adds environment variables."""
    with open(log_path, "w") as log, open(err_path or os.devnull, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "search", *args], cwd=cwd, stdout=log,
                                stderr=err if err_path else subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})


def kill_session(process, grace=20):
    """After its leader died: wait for Ray's fate-sharing to take the session's processes down,
    then end what is left of that session (only processes this test started)."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _session_members(process.pid):
        time.sleep(0.5)
    for pid in _session_members(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _session_members(sid):
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields[3] is the session id
            members.append(int(entry.name))
    return members


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray with 2 CPUs and one logical GPU (Ray schedules GPU fractions without a
    physical GPU; the trials still compute on the CPU) for a test module."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# ----------------------------------------------------------------------------- a private Ray

@pytest.fixture
def ray_tmpdir(monkeypatch):
    """A private Ray temp folder (RAY_TMPDIR; short, for Ray's socket paths) for the test's own
    Ray sessions: in-process through the environment, subprocesses through env={"RAY_TMPDIR": ...}.
    Other Ray instances on the machine are neither joined nor disturbed, and the test can find
    every process of its sessions (ray_processes). Whatever the test left running is ended."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    yield folder
    for pid in ray_processes(folder):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shutil.rmtree(folder, ignore_errors=True)


def ray_processes(folder):
    """Pids of the processes whose command line names `folder` or whose stdout/stderr go into it:
    every process of the Ray sessions under that temp folder (workers and agents included, whose
    process titles Ray rewrites)."""
    folder, found = str(folder), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            named = folder.encode() in (entry / "cmdline").read_bytes()
        except OSError:
            continue
        for fd in (1, 2):
            try:
                named = named or os.readlink(entry / "fd" / str(fd)).startswith(folder + "/")
            except OSError:
                pass
        if named:
            found.append(int(entry.name))
    return found


def run_main(module, args, capsys):
    """`python -m <module> ARGS` in-process: (exit code, stdout, stderr)."""
    main = __import__(f"{module}.cli", fromlist=["main"]).main
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
