"""The project's error types and the CLIs' one-line error format."""
import argparse
import sys


class UserError(Exception):
    """Bad input: a one-line message naming the file, field or value."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: the trial fails, a search goes on."""


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flag or value is one line `error: <prog>: <message>` on stderr, exit 2."""

    def error(self, message):
        first = (str(message).strip().splitlines() or ["bad arguments"])[0]
        print(f"error: {self.prog}: {first} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
