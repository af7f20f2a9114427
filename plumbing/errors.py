"""The error types: every module may import this one, and it imports nothing."""


class UserError(Exception):
    """A mistake in the user's input or setup: printed as one line, no traceback, exit code 2
    (runs.run)."""


class Diverged(UserError):
    """Training diverged (a loss, the weights or the logits became inf or nan): runs.run adds where
    the last good checkpoint is and what to lower."""


class Timeout(BaseException):
    """A user's function (a reward function) ran past its time limit (runs.time_limit). A
    BaseException, so that an `except Exception` inside that function does not swallow it."""
