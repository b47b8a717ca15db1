"""`spectra finetune` (temporary: the command still lives in spectra.lm.finetune; being moved here)."""

from spectra.lm.finetune import finetune_command as command  # noqa: F401
