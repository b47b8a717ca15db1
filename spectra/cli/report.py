"""`spectra report` (temporary: the command still lives in reports.build; being moved here)."""

from reports.build import report_command as command  # noqa: F401
