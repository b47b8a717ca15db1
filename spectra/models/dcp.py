"""A `torch.distributed.checkpoint` (DCP) folder -> a plain `save_pretrained` folder.

`spectra pretrain --strategy fsdp` already publishes every checkpoint in both forms (step_N/dcp/ for resume,
step_N/model.safetensors for every reader); this converts a DCP folder on its own (one copied without its
export, or written by another FSDP2 trainer with Hugging Face parameter names under a `model` key).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch.distributed.checkpoint as dcp
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from spectra.errors import SpectraError
from spectra.models.loading import check_finite

DCP_DIR = "dcp"


def dcp_to_pretrained(checkpoint: str | Path, out: str | Path, config: str | Path | None = None) -> Path:
    """Write the model of a DCP checkpoint as a `save_pretrained` folder `out` (safetensors) and return it.

    `checkpoint`: a DCP folder (holding `.metadata`), or a checkpoint folder with one in `dcp/`. `config`: a
    folder or config.json with the model's configuration (default: the one next to the DCP folder). The
    model is assembled in this process (it needs the whole model's memory, once, on the CPU); no process group
    is needed. `out` must not exist: it is written into a temporary folder and renamed into place."""
    src = Path(checkpoint)
    folder = src / DCP_DIR if (src / DCP_DIR / ".metadata").is_file() else src
    if not (folder / ".metadata").is_file():
        raise SpectraError(f"{src} is no torch.distributed.checkpoint folder (no .metadata, nor dcp/.metadata)")
    out = Path(out)
    if out.exists():
        raise SpectraError(f"{out} exists; pass a new folder")
    cfg_path = Path(config) if config is not None else next(
        (p for p in (folder, folder.parent) if (p / "config.json").is_file()), None)
    if cfg_path is None:
        raise SpectraError(f"no config.json next to {folder}; pass config= (a model folder or config.json)")
    try:
        cfg = AutoConfig.from_pretrained(cfg_path)
    except Exception as e:  # noqa: BLE001 - unreadable config: one line
        raise SpectraError(f"cannot read the model config {cfg_path} ({type(e).__name__}: {e})") from None
    model = AutoModelForCausalLM.from_config(cfg)  # on the CPU: RoPE's buffers are made, not loaded
    state = model.state_dict()
    try:
        with warnings.catch_warnings():  # "no process group: loading as a single process" is what is meant
            warnings.simplefilter("ignore")
            dcp.load({"model": state}, checkpoint_id=folder)
    except Exception as e:  # noqa: BLE001 - another model's checkpoint, or a damaged one: one line
        raise SpectraError(f"cannot load the model from {folder} ({type(e).__name__}: {str(e)[:200]})") from None
    check_finite(state.items(), folder)
    model.load_state_dict(state, strict=True)
    tmp = out.parent / f".tmp_{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    hf_logging.disable_progress_bar()
    model.save_pretrained(tmp)
    os.replace(tmp, out)
    return out
