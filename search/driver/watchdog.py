"""End every process of one Ray session folder, and nothing else (never `ray stop`, which ends every Ray on
the machine). Standard library only: the watchdog of a local Ray runs this file as a script,
`python -I watchdog.py DRIVER_PID SESSION_DIR`, so that it starts in a blink. It waits until the driver
writes to or closes its stdin (after ray.shutdown) or dies (SIGKILL included, when nothing can run in the
driver), then ends the session's processes: those whose command line names the folder (gcs_server,
raylet, ...) or whose stdout/stderr go into it (agents and workers, whose process titles Ray rewrites).
Ray's own fate-sharing ends only its direct children, and its agents and workers otherwise linger for a
minute or more. `search local-cluster stop` uses the same functions on its cluster's folder."""
import os
import select
import signal
import sys
import time


def folder_processes(folder, exclude=()):
    """The pids of the processes whose command line names `folder` or whose stdout/stderr go into it."""
    folder = str(folder).rstrip("/")
    marks, found = ((folder + "/").encode(), (folder + "\0").encode(), (folder + " ").encode()), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (os.getpid(), *exclude):
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read() + b"\0"
        except OSError:
            continue
        outputs = []
        for fd in (1, 2):
            try:
                outputs.append(os.readlink(f"/proc/{entry}/fd/{fd}"))
            except OSError:
                pass
        if any(m in cmdline for m in marks) or any(o.startswith(folder + "/") for o in outputs):
            found.append(int(entry))
    return found


def end_processes(find, timeout=60, grace=3):
    """SIGTERM what `find()` returns, SIGKILL what is still there `grace` s later, until nothing is left."""
    first, deadline = {}, time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not (pids := find()):
            return
        for pid in pids:
            if pid not in first:
                first[pid], sig = time.monotonic(), signal.SIGTERM
            elif time.monotonic() - first[pid] > grace:
                sig = signal.SIGKILL
            else:
                continue
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(0.2)


def watch(driver, session):
    for sig in (signal.SIGINT, signal.SIGHUP):  # Ctrl+C, a closed terminal: the driver handles them
        signal.signal(sig, signal.SIG_IGN)
    events = [sys.stdin]
    try:
        events.append(os.pidfd_open(driver))
    except (AttributeError, OSError):
        pass  # no pidfd: os.getppid() notices the driver's death within a second
    while os.getppid() == driver and not select.select(events, [], [], 1.0)[0]:
        pass
    end_processes(lambda: folder_processes(session, exclude=(driver,)))


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
