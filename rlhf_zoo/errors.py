"""User-facing errors.

Every error a user can cause (unknown name, bad option, bad data row) is a `ZooError`; the CLI prints
its message on one line and exits non-zero. Anything else is a bug and keeps its traceback.
"""


class ZooError(Exception):
    """An error caused by user input or environment, reported as one line."""


class UnknownNameError(ZooError, KeyError):
    """A name (algorithm, task, reward function) that no loaded plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DuplicateNameError(ZooError):
    """Two plugins registered the same name."""


class ConfigError(ZooError, ValueError):
    """A configuration value that is out of range, of the wrong type, or unknown."""


class DataError(ZooError, ValueError):
    """A data row that cannot be used; the message names the row and the key."""


class NonFiniteError(ZooError, FloatingPointError):
    """A loss, gradient or metric became NaN or infinite; the runner adds the iteration."""
