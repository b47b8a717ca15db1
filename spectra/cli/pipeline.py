"""`spectra pipeline` (temporary: the command still lives in pretrain.pipeline; being moved here)."""

from pretrain.pipeline import pipeline_command as command  # noqa: F401
