"""The driver's Ray: join a cluster (--address) or start a local one with a watchdog that ends its
processes however the driver ends (SIGKILL included); check that a trial fits on some node."""
import os
import signal
import subprocess
import sys
import contextlib

from htnet.errors import UserError, first_line
from search.driver import watchdog as watchdog_script
from search.driver.console import route_worker_output


_watchdog = None  # the watchdog of the local Ray this process started (subprocess.Popen)


def init_ray(address, num_cpus):
    """Join the Ray cluster at `address`, or start a local Ray with its watchdog (search.driver.watchdog).
    address="local" makes Ray start one even if a ray_current_cluster file (maybe left by a crashed
    Ray) or RAY_ADDRESS names another cluster. Returns False if Ray was already initialized (the
    caller's Ray, left alone), else True."""
    import threading

    import ray

    global _watchdog
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
        end_watchdog()  # this process's previous local Ray was shut down: clear what is left of it
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
        _watchdog = subprocess.Popen([sys.executable, "-I", watchdog_script.__file__, str(os.getpid()),
                                      context.address_info["session_dir"]],
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # ray.init replaces the driver's SIGTERM handler (with one that exits at once, and a crash handler that
    # aborts): put back the one that was there (the CLI's stops the search as Ctrl+C does). Without one of
    # ours, Ray's stays: SystemExit, so ray_session still shuts Ray down.
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)
    route_worker_output()
    return True


def end_watchdog():
    """Tell the watchdog that Ray is shut down; wait while it ends what is left of the session."""
    global _watchdog
    watchdog, _watchdog = _watchdog, None
    if watchdog is None:
        return
    with contextlib.suppress(OSError):
        watchdog.stdin.write(b"x")  # wakes it even if a forked child still holds this pipe open
        watchdog.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        watchdog.wait(timeout=90)


@contextlib.contextmanager
def ray_session(address, num_cpus):
    """init_ray around the block; Ray (if it started it) and its watchdog are shut down whatever ends the block
    (an error, Ctrl+C, SIGTERM)."""
    import ray

    started = init_ray(address, num_cpus)
    try:
        yield started
    finally:
        if started:
            try:
                ray.shutdown()
            finally:
                end_watchdog()


def check_resources(resources, where):
    """Ray keeps a trial that fits no node PENDING forever: refuse it before anything is recorded.
    A cluster that was joined (--address) may still get such a node from its autoscaler: a warning."""
    import ray

    cpu, gpu = float(resources["cpu"]), float(resources["gpu"])
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(n.get("CPU", 0) >= cpu and n.get("GPU", 0) >= gpu for n in nodes):
        return
    most = {k: max((n.get(k, 0) for n in nodes), default=0) for k in ("CPU", "GPU")}
    text = (f"{where}: a trial needs cpu={cpu:g}, gpu={gpu:g}, but no node of the Ray cluster has that "
            f"much (the most any node has: cpu={most['CPU']:g}, gpu={most['GPU']:g})")
    # a cluster that ray.init() started (one node, no autoscaler)
    if getattr(getattr(ray._private.worker, "_global_node", None), "ray_init_cluster", False):
        raise UserError(f"{text}; its trials would wait forever")
    print(f"warning: {text}; the trials wait until the cluster gets such a node", file=sys.stderr, flush=True)
