"""Training checkpoints: a `save_pretrained` model folder plus everything `--resume` needs.

runs/<id>/checkpoints/step_<N>/
    config.json, model.safetensors     the model (any HF tool or spectra analyzer reads it)
    trainer_state.pt                   optimizer, scheduler, RNG, per-rank data positions, counters
runs/<id>/checkpoints/latest           name of the newest complete checkpoint

Written into a temporary folder and renamed into place, then `latest` is replaced atomically,
so a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from spectra.errors import SpectraError


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, trainer_state: dict, keep: int = 3) -> Path:
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f".tmp_step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per checkpoint shard would garble ours
    model.save_pretrained(tmp)
    torch.save(trainer_state, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = ckpt_root / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, ckpt_root / "latest")
    _prune(ckpt_root, keep)
    return final


def _prune(ckpt_root: Path, keep: int) -> None:
    if keep <= 0:
        return
    done = sorted((p for p in ckpt_root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / "trainer_state.pt").is_file():
        raise SpectraError(f"{pointer} names {path.name}, which is incomplete; remove it or point latest elsewhere")
    return path


def load_trainer_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / "trainer_state.pt", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise SpectraError(f"cannot read {ckpt / 'trainer_state.pt'}: {e}") from None


def load_weights(model, ckpt: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise SpectraError(f"{ckpt} has no safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise SpectraError(f"checkpoint {ckpt} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
