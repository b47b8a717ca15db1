"""`spectra grad-subspace` (temporary: the command still lives in spectra.analysis.subspace; being moved here)."""

from spectra.analysis.subspace import grad_subspace_command as command  # noqa: F401
