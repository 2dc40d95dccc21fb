"""The driver's Ray: join a cluster (--address) or start a local one, which ends with the driver (ray.shutdown,
or Ray's fate-sharing when the driver is SIGKILLed); check that a trial fits on some node."""
import contextlib
import signal
import sys
import threading

import ray

from htnet.errors import UserError, first_line
from search.driver.console import library_output

_started_here = False  # this process started the Ray it is connected to: one node, no autoscaler


@contextlib.contextmanager
def ray_session(address, num_cpus):
    """Join the Ray cluster at `address`, or start a local Ray (even where RAY_ADDRESS or a stale file names
    another) and shut it down whatever ends the block; a Ray already initialised (the caller's) is left alone."""
    global _started_here
    if ray.is_initialized():
        yield
        return
    sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        try:
            ray.init(address=address)
        except (ConnectionError, ValueError) as e:
            raise UserError(f"--address {address}: {first_line(e)}") from None
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    _started_here = not address
    # ray.init replaces SIGTERM's handler with one that exits at once: put back the CLI's (it stops as Ctrl+C does)
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)
    try:
        yield
    finally:
        _started_here = False
        with library_output(stderr=True):
            ray.shutdown()


def check_resources(resources, where):
    """Ray keeps a trial that fits no node PENDING forever: refuse it before anything is recorded (a joined
    cluster's autoscaler may still add such a node: a warning)."""
    cpu, gpu = float(resources["cpu"]), float(resources["gpu"])
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(n.get("CPU", 0) >= cpu and n.get("GPU", 0) >= gpu for n in nodes):
        return
    most = {k: max((n.get(k, 0) for n in nodes), default=0) for k in ("CPU", "GPU")}
    text = (f"{where}: a trial needs cpu={cpu:g}, gpu={gpu:g}, but no node of the Ray cluster has that "
            f"much (the most any node has: cpu={most['CPU']:g}, gpu={most['GPU']:g})")
    if _started_here:
        raise UserError(f"{text}; its trials would wait forever")
    print(f"warning: {text}; the trials wait until the cluster gets such a node", file=sys.stderr, flush=True)
