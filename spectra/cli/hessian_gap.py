"""`spectra hessian-gap` (temporary: the command still lives in spectra.analysis.hessian; being moved here)."""

from spectra.analysis.hessian import hessian_gap_command as command  # noqa: F401
