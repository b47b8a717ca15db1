"""The one exception type the CLI turns into a single `error: ...` line (no traceback wall)."""


class SpectraError(Exception):
    """Bad input a user can fix: missing files, wrong model type, NaN gradients, corrupt stores."""
