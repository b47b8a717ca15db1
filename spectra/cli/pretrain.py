"""`spectra pretrain`: options from `PretrainConfig` (pretrain/configs.py, no torch), the loop imported only when
the command runs (pretrain/loop.py), so `spectra pretrain --help` and a bad flag stay fast."""

from __future__ import annotations

from pretrain.configs import PretrainConfig
from spectra.cli.options import command_from


def _pretrain(cfg: PretrainConfig) -> None:
    from pretrain.loop import pretrain

    print(f"run written to {pretrain(cfg)}")


command = command_from(
    PretrainConfig, _pretrain,
    """Pretrain a LLaMA (GaLore sizes) and write weight/gradient snapshots to runs/<id>/snapshots.zarr.

    Every option can also come from --config FILE (YAML or JSON, same names); the command line wins.
    A run folder is locked while it trains; an existing run needs --resume (or --overwrite).""")
