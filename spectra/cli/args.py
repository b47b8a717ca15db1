"""The option groups every command shares, defined once (help, default, range): a command's options
dataclass inherits the groups it needs and adds its own fields (litgpt's args.py, as dataclasses).

    @dataclass
    class HessianGapArgs(InputArgs, DataArgs, TokenizerArgs, DeviceArgs, OutputArgs):
        k: int = opt(8, "gap between the k-th and (k+1)-th eigenvalue", min=1)

tests/test_cli.py checks that every command's --device (--tokenizer, --data, ...) has this help text.
Only dataclasses and typing here: `spectra CMD --help` must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from spectra.config import opt

DEFAULT_CALIB_SEQS, DEFAULT_CALIB_SEQ_LEN = 256, 256  # spectra.compression.calibration uses the same
LOSS_WEIGHTS = ("auto", "fisher", "relative", "output")


@dataclass
class InputArgs:
    """The input's older spellings (scripts keep working); PATH is the way to give it."""

    ckpt: Optional[str] = opt(None, "Same as PATH (the older spelling; scripts keep working).",
                              flag=("--ckpt", "--model"))


@dataclass
class DeviceArgs:
    device: str = opt("auto", "Where the work runs: auto (cuda when available), cpu, cuda or cuda:N.")


@dataclass
class TokenizerArgs:
    tokenizer: Optional[str] = opt(None, "Tokenizer: a hub name, a folder or `bytes`. Default: the one saved with "
                                         "the model, else the run's (run_config.json), else t5-base.")


@dataclass
class DataArgs:
    data: Optional[str] = opt(None, "Text to run on: json/jsonl(.gz)/txt/parquet files, globs or folders. "
                                    "Default: hub C4 (allenai/c4 en).")


@dataclass
class CalibrationArgs:
    calib_data: Optional[str] = opt(None, "Calibration text (json/jsonl(.gz)/txt/parquet files, globs or folders) "
                                          "for loss-aware maps and whitening. Default: hub C4 train.")
    calib_seqs: int = opt(DEFAULT_CALIB_SEQS, "Calibration sequences.", min=1, max=1_000_000)
    calib_seq_len: int = opt(DEFAULT_CALIB_SEQ_LEN, "Tokens per calibration sequence (at most the model's "
                                                    "positions).", min=2, max=1_000_000)
    damping: float = opt(0.01, "Relative damping of the input covariance, C + d·mean(diag C)·I.", min=0.0, max=1e6)
    loss_weight: Literal["auto", "fisher", "relative", "output"] = opt(
        "auto", "How output error becomes a loss weight per matrix (auto: fisher for causal LMs, output otherwise).")


@dataclass
class OutputArgs:
    out: Optional[str] = opt(None, "Where to write (default: inside the run, see the command's help).")


@dataclass
class OverwriteArgs:
    overwrite: bool = opt(False, "Replace an existing output that would otherwise be refused (what it held is "
                                 "deleted).")


@dataclass
class SeedArgs:
    seed: int = opt(0, "Random seed.", min=0, max=2**63 - 1)
