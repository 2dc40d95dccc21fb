"""The driver's Ray: join a cluster (--address) or start a local one, whose processes Ray ends with the driver
(ray.shutdown, or Ray's own fate-sharing when the driver is SIGKILLed); check that a trial fits on some node."""
import contextlib
import signal
import sys
import threading

import ray

from htnet.errors import UserError, first_line
from search.driver.console import ray_shutdown_output

_started_here = False  # the Ray this process is connected to is one it started (ray.init without an address)


def init_ray(address, num_cpus):
    """Join the Ray cluster at `address`, or start a local Ray. address="local" makes Ray start one even if a
    ray_current_cluster file (maybe left by a crashed Ray) or RAY_ADDRESS names another cluster. Returns False
    if Ray was already initialized (the caller's Ray, left alone), else True."""
    global _started_here
    if ray.is_initialized():
        return False
    if num_cpus is not None and num_cpus < 1:
        raise UserError(f"--num-cpus must be >= 1, got {num_cpus}")
    sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        try:
            ray.init(address=address)
        except (ConnectionError, ValueError) as e:
            raise UserError(f"--address {address}: {first_line(e)}") from None
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    _started_here = not address
    # ray.init replaces the driver's SIGTERM handler (with one that exits at once, and a crash handler that
    # aborts): put back the one that was there (the CLI's stops the search as Ctrl+C does). Without one of
    # ours, Ray's stays: SystemExit, so ray_session still shuts Ray down.
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)
    return True


@contextlib.contextmanager
def ray_session(address, num_cpus):
    """init_ray around the block; Ray (if it started it) is shut down whatever ends the block (an error,
    Ctrl+C, SIGTERM)."""
    global _started_here
    started = init_ray(address, num_cpus)
    try:
        yield started
    finally:
        if started:
            _started_here = False
            with ray_shutdown_output():
                ray.shutdown()


def check_resources(resources, where):
    """Ray keeps a trial that fits no node PENDING forever: refuse it before anything is recorded.
    A cluster that was joined (--address) may still get such a node from its autoscaler: a warning."""
    cpu, gpu = float(resources["cpu"]), float(resources["gpu"])
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(n.get("CPU", 0) >= cpu and n.get("GPU", 0) >= gpu for n in nodes):
        return
    most = {k: max((n.get(k, 0) for n in nodes), default=0) for k in ("CPU", "GPU")}
    text = (f"{where}: a trial needs cpu={cpu:g}, gpu={gpu:g}, but no node of the Ray cluster has that "
            f"much (the most any node has: cpu={most['CPU']:g}, gpu={most['GPU']:g})")
    if _started_here:  # a local Ray: one node, no autoscaler
        raise UserError(f"{text}; its trials would wait forever")
    print(f"warning: {text}; the trials wait until the cluster gets such a node", file=sys.stderr, flush=True)
