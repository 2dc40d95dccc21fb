"""What a search shows on the console: our own lines (the header, the trials' events and a periodic table from
search.driver.progress, the summary). Ray's, MLflow's and Optuna's log records, Python warnings, Ray Tune's
progress output and the trials' worker output go to the search's log file; with --verbose they are also on
the console, as the libraries print them."""
import collections
import contextlib
import importlib
import io
import logging
import os
import sys
import threading
from pathlib import Path

QUIET_ENV = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # tqdm bars of every artifact download
OUR_LOGGERS = ("search", "htnet")  # their warnings stay on the console

_current = None  # the Console in effect (one search per process)


def log_path(storage, name):
    return Path(storage) / "logs" / f"{name}.log"


class LogFile(io.TextIOBase):
    """A text stream that creates its file (and folder) at its first write, so a search refused before anything
    is logged leaves none; writes from Ray's threads and logging handlers are serialised."""

    def __init__(self, path):
        super().__init__()
        self.path, self._file, self._lock = Path(path), None, threading.Lock()

    def write(self, text):
        with self._lock:
            if self._file is None:
                if not text:
                    return 0
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8", errors="replace")
            written = self._file.write(text)
            self._file.flush()
            return written

    def close(self):
        with self._lock:
            if self._file is not None:
                self._file.close()
        super().close()


Console = collections.namedtuple("Console", "log out verbose")


def is_console_handler(handler):
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


@contextlib.contextmanager
def search_console(path, verbose=0, out=None):
    """Route the libraries' output into the log file at `path` for the block (see the module doc); `out` gets our
    own lines (default: stdout). verbose 0 takes it off the console, 1 or 2 keep it there too."""
    global _current
    for module in ("ray", "mlflow", "optuna"):  # they set up their loggers' handlers when imported
        importlib.import_module(module)
    log = LogFile(path)

    def to_log():  # one per logger: ray.init sets its own format on the "ray" logger's handlers
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        return handler

    warnings = logging.StreamHandler(sys.stderr)  # as logging's last resort, which a handler on root turns off
    warnings.setLevel(logging.WARNING)
    warnings.setFormatter(logging.Formatter("%(message)s" if verbose else "warning: %(message)s"))
    loggers = [logger for logger in logging.root.manager.loggerDict.values()
               if isinstance(logger, logging.Logger) and any(map(is_console_handler, logger.handlers))]
    saved = {logger: logger.handlers[:] for logger in [logging.root, *loggers, *map(logging.getLogger, OUR_LOGGERS)]}
    environ = {key: os.environ.get(key) for key in QUIET_ENV}
    for logger in loggers:  # the libraries' own handlers: beside or instead of the console
        logger.handlers = ([h for h in logger.handlers if verbose or not is_console_handler(h)]
                           + ([] if logger.propagate else [to_log()]))
    logging.root.addHandler(to_log())  # what propagates (urllib3, torch, ours, Python warnings)
    for logger in [logging.root] if verbose else map(logging.getLogger, OUR_LOGGERS):
        logger.addHandler(warnings)
    if not verbose:
        logging.captureWarnings(True)
        os.environ.update(QUIET_ENV)
    _current = Console(log, out or sys.stdout, verbose)
    try:
        yield _current
    finally:
        _current = None
        dispatcher().remove_handler("htnet_log")
        logging.captureWarnings(False)
        for logger, handlers in saved.items():
            logger.handlers = handlers
        for key, value in environ.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        log.close()


def out():
    """Where our own lines go: the console of the search in progress, else stdout."""
    return _current.out if _current else sys.stdout


def route_worker_output():
    """After ray.init: the workers' output that Ray forwards to the driver goes to the log file, and stays on the
    console only with --verbose. Ray prints it through a dispatcher of named handlers (ray._private)."""
    from ray._private.worker import filter_autoscaler_events

    def worker_lines(batch):  # of the autoscaler's lines only its events, as Ray prints them
        lines = batch.get("lines", [])
        if batch.get("pid") == "autoscaler":
            lines = filter_autoscaler_events(lines)
        who = batch.get("actor_name") or batch.get("task_name") or "worker"
        log.write("".join(f"({who} pid={batch.get('pid')}) {line}\n" for line in lines))

    if _current is not None:
        log = _current.log
        if not _current.verbose:
            dispatcher().remove_handler("ray_print_logs")
        dispatcher().remove_handler("htnet_log")
        dispatcher().add_handler("htnet_log", worker_lines)


def dispatcher():
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    return global_worker_stdstream_dispatcher


def library_stdout():
    """Around tuner.fit: Ray Tune prints its progress (configuration boxes, the TensorBoard hint, tables) to
    stdout, which goes to the log file unless --verbose."""
    if _current is None or _current.verbose:
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(_current.log)
