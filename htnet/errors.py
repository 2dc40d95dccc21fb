class UserError(Exception):
    """Bad input: a one-line message naming the file, field or value."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite: the trial fails, a search goes on."""
