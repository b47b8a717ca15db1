"""`spectra spectrum` (temporary: the command still lives in spectra.analysis.spectrum; being moved here)."""

from spectra.analysis.spectrum import spectrum_command as command  # noqa: F401
