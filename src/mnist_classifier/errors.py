"""The exceptions the CLI turns into one line on stderr: ``UserError`` (exit status 2) and its kinds,
``DivergedError`` (2), ``CannotWrite`` (2) and ``Interrupted`` (130)."""


class UserError(Exception):
    """A problem the user can fix (a bad value, a missing file, an unavailable device).

    The message is shown as-is on one line, without a traceback, so it should say what was wrong
    and, where possible, what to do instead.
    """


class DivergedError(UserError):
    """The training loss became NaN or infinite."""


class CannotWrite(UserError):
    """A file or folder could not be written: a full disk, a read-only file system, a file in the way. Its own
    kind, so a caller with a fallback can tell the place from the content (serve: the temporary folder is
    full, not "the model does not export")."""


class Interrupted(UserError):
    """Work was stopped by Ctrl-C (SIGINT) or SIGTERM after saving what resumes it; ``status`` is the exit status
    a shell expects of a command that a signal stopped: 128 + the signal (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, status: int = 130) -> None:
        super().__init__(message)
        self.status = status
