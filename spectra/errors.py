"""The one exception type the CLI turns into a single `error: ...` line (no traceback wall)."""


class SpectraError(Exception):
    """Bad input a user can fix: missing files, wrong model type, NaN gradients, corrupt stores."""


class Terminated(BaseException):
    """SIGTERM turned into an exception, so cleanup runs and the CLI exits 143 (like Ctrl-C's 130).
    A BaseException, like KeyboardInterrupt, so `except Exception` blocks don't swallow it."""
