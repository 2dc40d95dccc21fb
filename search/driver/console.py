"""A search's own lines on the console; the libraries' log records, warnings, Ray Tune's progress and the trials'
output (which Ray's driver prints) in the search's log file, and with --verbose on the console too."""
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
Console = collections.namedtuple("Console", "log out verbose")
_current = None  # the Console of the search in progress (one per process)


def log_path(storage, name):
    return Path(storage) / "logs" / f"{name}.log"


class LogFile(io.TextIOBase):
    """Created at its first write (a search refused before it logs anything leaves none); writes from Ray's
    threads and logging handlers are serialised."""

    def __init__(self, path):
        self.path, self.file, self.lock = Path(path), None, threading.Lock()

    def write(self, text):
        with self.lock:
            if text and self.file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "a", encoding="utf-8", errors="replace", buffering=1)
            return self.file.write(text) if text else 0

    def close(self):
        with self.lock:
            if self.file is not None:
                self.file.close()
        super().close()


def is_console_handler(handler):
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


@contextlib.contextmanager
def search_console(path, verbose=0, out=None):
    """Route the libraries' output into the log file at `path` for the block; `out` gets our own lines (default:
    stdout). verbose 0 takes the libraries' output off the console, 1 or 2 keep it there too."""
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


class LibraryOutput:
    """sys.stdout or sys.stderr during a search: what Ray's driver prints from its own threads (the workers' output)
    goes to the log file (and the console with --verbose); the search's own thread's, to the console."""

    def __init__(self, console, log, verbose):
        self.console, self.log, self.verbose, self.owner = console, log, verbose, threading.current_thread()

    def write(self, text):
        ours = threading.current_thread() is self.owner
        if ours or self.verbose:
            self.console.write(text)
        if not ours:
            self.log.write(text)
        return len(text)

    def isatty(self):  # also after the search, where a library kept this stream (colorama does, at exit)
        return not self.console.closed and self.console.isatty()

    def __getattr__(self, name):  # flush, fileno, encoding, closed: the console's
        return getattr(self.console, name)


def library_output(stderr=False):
    """Into the log file unless --verbose: Ray Tune's progress (around tuner.fit: stdout), the workers' last lines
    that ray.shutdown prints from our own thread (stdout and stderr)."""
    stack = contextlib.ExitStack()
    if _current is not None and not _current.verbose:
        stack.enter_context(contextlib.redirect_stdout(_current.log))
        if stderr:
            stack.enter_context(contextlib.redirect_stderr(_current.log))
    return stack
