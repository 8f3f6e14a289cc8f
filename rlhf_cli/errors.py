"""The one exception type that carries a user-facing message.

Anything the user can fix (a config key, a data row, a missing checkpoint) is raised as a
`UserError`; the CLI prints it as a single `error: ...` line and exits non-zero.
"""


# EX_IOERR (sysexits.h): the run directory cannot take what must be written (not writable, disk full).
EXIT_WRITE_FAILED = 74


class UserError(Exception):
    """An error caused by the user's input, shown without a traceback."""

    def __init__(self, message: str, *, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def at(location: str, message: str) -> UserError:
    """A UserError whose message starts with the place at fault (`file:line`, a key, a path)."""
    return UserError(f"{location}: {message}")
