"""`spectra eval` (temporary: the command still lives in spectra.lm.evaluate; being moved here)."""

from spectra.lm.evaluate import eval_command as command  # noqa: F401
