"""`spectra pretrain` (temporary: the command still lives in pretrain.loop; being moved here)."""

from pretrain.loop import pretrain_command as command  # noqa: F401
