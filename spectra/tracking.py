"""Optional experiment tracking next to metrics.jsonl: TensorBoard or Weights & Biases.

`--log-to tensorboard` writes event files to `<run>/tensorboard/` (needs the `tensorboard` package);
`--log-to wandb` logs to W&B when `wandb` is installed and configured (WANDB_MODE=offline works
without a network). metrics.jsonl stays the record spectra itself reads; trackers only mirror it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from spectra.errors import SpectraError

LogTo = Literal["none", "tensorboard", "wandb"]


class Tracker:
    """Mirror numeric metric rows to TensorBoard or W&B; a no-op for "none"."""

    def __init__(self, kind: str, folder: str | Path, name: str, config: dict | None = None):
        self.kind, self._w = kind, None
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                msg = "--log-to tensorboard needs the tensorboard package (pip install tensorboard)"
                raise SpectraError(msg) from None
            self._w = SummaryWriter(log_dir=str(Path(folder) / "tensorboard"))
        elif kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise SpectraError("--log-to wandb needs the wandb package (pip install wandb)") from None
            self._w = wandb.init(project="spectra", name=name, dir=str(folder), config=config or {}, reinit=True)
        elif kind != "none":
            raise SpectraError(f"--log-to must be none, tensorboard or wandb, not {kind!r}")

    def log(self, row: dict, step: int) -> None:
        values = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and k != "step"}
        if self.kind == "tensorboard":
            for k, v in values.items():
                self._w.add_scalar(k, v, step)
        elif self.kind == "wandb":
            self._w.log(values, step=step)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self._w.close()
        elif self.kind == "wandb":
            self._w.finish()
