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
    """argparse with the CLIs' error format: a bad flag or value prints one line
    `error: <prog>: <message>` on stderr and exits 2, without the usage text."""

    def error(self, message):
        first = str(message).strip().splitlines()[0] if str(message).strip() else "bad arguments"
        print(f"error: {self.prog}: {first} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
