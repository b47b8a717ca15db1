"""`spectra compress` (temporary: the command still lives in spectra.compression.lowrank; being moved here)."""

from spectra.compression.lowrank import compress_command as command  # noqa: F401
