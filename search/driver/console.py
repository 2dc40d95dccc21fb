"""What a search shows on the console: our own lines (the header, the trials' events and a periodic table from
search.driver.progress, the summary). Ray's, MLflow's and Optuna's log records (standard logging handlers on
their loggers), Python warnings, Ray Tune's progress output and the trials' worker output (which Ray's driver
prints to its stdout and stderr) go to the search's log file; with --verbose they are also on the console, as
the libraries print them."""
import collections
import contextlib
import io
import logging
import os
import sys
import threading
from pathlib import Path

import mlflow  # noqa: F401 - these three set up their loggers' handlers when imported
import optuna  # noqa: F401
import ray  # noqa: F401

QUIET_ENV = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # tqdm bars of every artifact download
             "RAY_COLOR_PREFIX": "0"}  # the workers' lines without ANSI colours: they go to the log file
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
        with contextlib.redirect_stdout(LibraryOutput(sys.stdout, log, verbose)), \
                contextlib.redirect_stderr(LibraryOutput(sys.stderr, log, verbose)):
            yield _current
    finally:
        _current = None
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


class LibraryOutput(io.TextIOBase):
    """sys.stdout or sys.stderr during a search. Ray's driver prints its workers' output there (the trials'
    prints and log records, Ray's own lines), from a thread of its own: that goes to the log file, and to the
    console too with --verbose. What the search's own thread prints stays on the console."""

    def __init__(self, console, log, verbose):
        super().__init__()
        self.console, self.log, self.verbose, self.owner = console, log, verbose, threading.current_thread()

    def write(self, text):
        ours = threading.current_thread() is self.owner
        if ours or self.verbose:
            self.console.write(text)
        if not ours:
            self.log.write(text)
        return len(text)

    def flush(self):
        self.console.flush()

    @property
    def closed(self):  # after the search too, where a library kept this stream (colorama does, at exit)
        return self.console.closed

    def isatty(self):
        return not self.closed and self.console.isatty()

    def fileno(self):
        return self.console.fileno()

    @property
    def encoding(self):
        return getattr(self.console, "encoding", "utf-8")


def library_stdout():
    """Around tuner.fit: Ray Tune prints its progress (configuration boxes, the TensorBoard hint, tables) to
    stdout, which goes to the log file unless --verbose."""
    if _current is None or _current.verbose:
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(_current.log)


def ray_shutdown_output():
    """Around ray.shutdown: it prints the workers' last (deduplicated) lines from our own thread; they go where
    the rest of the workers' output went."""
    if _current is None or _current.verbose:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(_current.log))
    stack.enter_context(contextlib.redirect_stderr(_current.log))
    return stack
