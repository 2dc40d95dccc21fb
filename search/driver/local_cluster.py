"""`python -m search local-cluster start|env|stop`: cluster-local.yaml on one machine (an S3 server, a Ray head
with Ray's fake multi-node autoscaler, MLflow); `stop` ends this cluster's processes only, never every Ray."""
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import boto3
import yaml

from htnet.errors import UserError
from htnet.io import atomic_write, ensure_writable_dir

CLUSTER_LOCAL_YAML = Path(__file__).resolve().parents[2] / "cluster-local.yaml"
BUCKET = "htnet"
STATE = "cluster.json"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what, log, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # not up yet
            if check():
                return
        time.sleep(0.5)
    raise UserError(f"{what} did not come up within {timeout} s (its log: {log})")


def read_state(folder):
    path = Path(folder).resolve() / STATE
    if not path.is_file():
        raise UserError(f"{path}: no local cluster was started from this folder "
                        f"(python -m search local-cluster start --dir {folder})")
    return json.loads(path.read_text())


def exports(state):
    return "".join(f"export {k}={v}\n" for k, v in state["env"].items())


def start(folder, idle_timeout_minutes=None, max_workers=None, s3_endpoint=None):
    """Start the cluster; returns its state ("env": what a driver's shell needs, as `exports` prints it)."""
    folder = ensure_writable_dir(Path(folder).resolve())
    if (folder / STATE).exists():
        raise UserError(f"{folder / STATE}: a local cluster was started from this folder: "
                        f"`python -m search local-cluster stop --dir {folder}` first")
    if missing := [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(k)]:
        raise UserError(f"set {' and '.join(missing)} in the environment (any value for the local S3 server)")
    ip = "127.0.0.1"  # every node of this cluster on the loopback: nothing of it is reached from outside
    ports = {k: free_port() for k in ("s3", "ray", "mlflow")}
    # Ray's temp folder: short (Ray's socket paths have a length limit) and this folder's own
    temp = Path(tempfile.gettempdir()) / f"htnet-ray-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}"
    token = folder / "ray_auth_token"  # the Ray cluster's token (Ray 2.x authenticates its clients)
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    s3 = s3_endpoint or f"http://127.0.0.1:{ports['s3']}"
    env = {"RAY_ADDRESS": f"{ip}:{ports['ray']}", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
           "HTNET_RAY_STORAGE": f"s3://{BUCKET}/ray", "AWS_ENDPOINT_URL": s3, "MLFLOW_S3_ENDPOINT_URL": s3,
           "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    state = {"folder": str(folder), "ray_temp_dir": str(temp), "ports": ports, "env": env, "pids": {}}
    child_env = {**os.environ, **env}

    def launch(name, command, cwd=folder, extra=None):
        log = open(folder / f"{name}.log", "ab")
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**child_env, **(extra or {})}, start_new_session=True)
        state["pids"][name] = process.pid
        return process

    try:
        if not s3_endpoint:
            launch("s3", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(ports["s3"])])
        client = boto3.client("s3", endpoint_url=s3, region_name=env["AWS_DEFAULT_REGION"])
        wait_for(lambda: client.list_buckets() is not None, f"the S3 server on {s3}", folder / "s3.log")
        client.create_bucket(Bucket=BUCKET)
        # The autoscaler's copy of cluster-local.yaml, with this head's address; its file_mounts must exist
        config = yaml.safe_load(CLUSTER_LOCAL_YAML.read_text())
        config["provider"]["gcs_address"] = env["RAY_ADDRESS"]
        if idle_timeout_minutes is not None:
            config["idle_timeout_minutes"] = idle_timeout_minutes
        if max_workers is not None:
            config["max_workers"] = config["available_node_types"]["gpu_worker"]["max_workers"] = max_workers
        stage = folder / "autoscaler"
        for local in config["file_mounts"].values():
            (stage / local).mkdir(parents=True, exist_ok=True)
        (stage / "cluster-local.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        head = launch("ray-head", [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                                   f"--port={ports['ray']}", f"--node-ip-address={ip}", "--num-cpus=0", "--num-gpus=0",
                                   "--autoscaling-config=cluster-local.yaml", f"--temp-dir={temp}",
                                   "--include-dashboard=false", "--disable-usage-stats"],
                      cwd=stage, extra={"RAY_FAKE_CLUSTER": "1"})
        wait_for(lambda: (folder / "ray-head.log").read_text().count("Ray runtime started") or head.poll() is not None,
                 "the Ray head", folder / "ray-head.log")
        if head.poll() is not None:
            raise UserError(f"the Ray head did not start (its log: {folder / 'ray-head.log'})")
        launch("mlflow", [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--workers", "1",
                          "--port", str(ports["mlflow"]), "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                          "--artifacts-destination", f"s3://{BUCKET}/mlartifacts"])
        wait_for(lambda: urllib.request.urlopen(f"{env['MLFLOW_TRACKING_URI']}/health", timeout=2).status == 200,
                 "the MLflow server", folder / "mlflow.log", timeout=120)
    except BaseException:
        stop_processes(state)
        raise
    with atomic_write(folder / STATE) as f:
        json.dump(state, f, indent=1)
    return state


def cluster_processes(state):
    """The pids of the process groups it started and of the processes whose command line names its Ray temp
    folder or whose stdout/stderr go into it (worker nodes, Ray's workers: Ray rewrites their titles)."""
    folder, groups, found = state["ray_temp_dir"], set(state["pids"].values()), []
    for pid in (int(entry) for entry in os.listdir("/proc") if entry.isdigit() and int(entry) != os.getpid()):
        try:
            named = os.getpgid(pid) in groups or folder.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                named = named or os.readlink(f"/proc/{pid}/fd/{fd}").startswith(folder + "/")
        if named:
            found.append(pid)
    return found


def stop_processes(state, timeout=60, grace=3):
    """SIGTERM the cluster's processes, SIGKILL those still there `grace` s later, until none is left."""
    first, deadline = {}, time.monotonic() + timeout
    while time.monotonic() < deadline and (pids := cluster_processes(state)):
        for pid in pids:
            if pid not in first:
                first[pid], sig = time.monotonic(), signal.SIGTERM
            elif time.monotonic() - first[pid] > grace:
                sig = signal.SIGKILL
            else:
                continue
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        time.sleep(0.2)


def stop(folder):
    """End the cluster's processes; its records (mlflow.db, the logs) stay, the local S3's contents (in memory) go."""
    state = read_state(folder)
    stop_processes(state)
    shutil.rmtree(state["ray_temp_dir"], ignore_errors=True)
    (Path(state["folder"]) / STATE).unlink(missing_ok=True)
    return state
