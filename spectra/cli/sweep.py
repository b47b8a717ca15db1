"""`spectra sweep` (temporary: the command still lives in spectra.compression.sweep; being moved here)."""

from spectra.compression.sweep import sweep_command as command  # noqa: F401
