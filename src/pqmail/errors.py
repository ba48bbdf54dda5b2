"""Error types shared by every layer.

Each carries what an administrator needs to act: the file and line for configuration errors, and
qmail's split between temporary (retry later, exit 111) and permanent (bounce, exit 100) failures.
"""

from __future__ import annotations

EXIT_PERMANENT = 100
EXIT_TEMPORARY = 111


class PqmailError(Exception):
    """Base class: a failure with a one-line message fit for an operator."""

    exit_code = EXIT_TEMPORARY


class ConfigError(PqmailError):
    """A control file, users/assign or another configuration file is malformed or unreadable.

    ``str()`` gives ``path:line: message`` (or ``path: message`` when no line applies).
    """

    def __init__(self, path: str, message: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.message}"


class TemporaryFailure(PqmailError):
    """Deferral: qmail's report letter Z / exit 111."""

    exit_code = EXIT_TEMPORARY


class PermanentFailure(PqmailError):
    """Bounce: qmail's report letter D / exit 100."""

    exit_code = EXIT_PERMANENT


class UsageError(PqmailError):
    """The operator asked for something impossible (unknown box, existing tree, bad argument)."""

    exit_code = EXIT_PERMANENT
