"""`spectra ranks` (temporary: the command still lives in spectra.compression.ranks; being moved here)."""

from spectra.compression.ranks import ranks_command as command  # noqa: F401
