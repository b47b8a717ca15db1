"""Training checkpoints: a `save_pretrained` model folder plus everything `--resume` needs, no pickle.

runs/<id>/checkpoints/step_<N>/
    config.json, model.safetensors     the model (any HF tool or spectra analyzer reads it)
    tokenizer files                    the tokenizer the run trained with (`save_pretrained`)
    trainer_state.safetensors          every tensor of the trainer state: optimizer moments, RNG
                                       states, per-rank data buffers
    trainer_state.json                 the rest (step, tokens, scheduler, config, data positions),
                                       with references into the safetensors file
runs/<id>/checkpoints/latest           symlink to the newest complete checkpoint (HF tools accept it)

Nothing here is unpickled: a crafted file can fail to load, but it cannot run code. A checkpoint
is written into a temporary folder, fsynced and renamed into place, then `latest` is replaced
atomically, so a kill at any moment leaves the previous checkpoint intact and `latest` whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging as hf_logging

from spectra.data import PackState
from spectra.errors import SpectraError
from spectra.io.runs import LATEST, checkpoint_step_of, latest_checkpoint
from spectra.models.loading import check_finite

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
STATE_FORMAT = 2


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


# --------------------------------------------------------------------------- pickle-free state
def _encode(obj, name: str, tensors: dict):
    """JSON-able form of `obj`; tensors and arrays go to `tensors` under their path `name`."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray):
        tensors[name] = torch.from_numpy(
            np.ascontiguousarray(obj).astype(np.int64 if obj.dtype.kind in "iu" else obj.dtype)
        )
        return {"__ndarray__": name, "dtype": obj.dtype.str}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):  # keys keep their type (optimizer state is keyed by int)
        return {"__dict__": [[k, _encode(v, f"{name}.{k}", tensors)] for k, v in obj.items()]}
    if dataclasses.is_dataclass(obj):
        return {
            "__dataclass__": type(obj).__name__,
            "fields": {
                f.name: _encode(getattr(obj, f.name), f"{name}.{f.name}", tensors) for f in dataclasses.fields(obj)
            },
        }
    raise TypeError(f"cannot store {type(obj).__name__} at {name} in a trainer state")


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
    if "__dataclass__" in obj:
        if obj["__dataclass__"] != "PackState":  # an allow-list of one: nothing else is rebuilt
            raise ValueError(f"unknown record type {obj['__dataclass__']!r}")
        return PackState(**{k: _decode(v, tensors) for k, v in obj["fields"].items()})
    raise ValueError("unknown record in trainer state")


def save_trainer_state(folder: Path, state: dict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": STATE_FORMAT, "state": _encode(state, "s", tensors)}
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE_JSON).write_text(json.dumps(doc))


def load_trainer_state(ckpt: Path) -> dict:
    """The trainer state of a checkpoint folder (safetensors + JSON; never unpickles anything)."""
    if not (ckpt / STATE_JSON).is_file() and (ckpt / "trainer_state.pt").is_file():
        raise SpectraError(
            f"{ckpt} was written by an older spectra (pickled trainer_state.pt), which is not "
            "loaded for safety; restart the run or resume from a newer checkpoint"
        )
    try:
        doc = json.loads((ckpt / STATE_JSON).read_text())
        if doc.get("format") != STATE_FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {STATE_FORMAT}")
        return _decode(doc["state"], load_file(str(ckpt / STATE_TENSORS)))
    except Exception as e:  # noqa: BLE001 - corrupt or crafted: one line
        raise SpectraError(f"cannot read the trainer state in {ckpt} ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- folders
def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):  # the sharded checkpoint's dcp/ folder included
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def save_checkpoint(run_dir: Path, step: int, model, trainer_state: dict, keep: int = 3, tokenizer=None) -> Path:
    ckpt_root = run_dir / "checkpoints"
    check_publishable(model, step, ckpt_root)
    tmp = fresh_tmp(ckpt_root, step)
    hf_logging.disable_progress_bar()  # one bar per checkpoint shard would garble ours
    model.save_pretrained(tmp)
    return publish(ckpt_root, tmp, step, trainer_state, keep, tokenizer)


def fresh_tmp(ckpt_root: Path, step: int) -> Path:
    """The empty temporary folder checkpoint `step` is written into (a killed attempt's leftovers removed)."""
    tmp = ckpt_root / f".tmp_step_{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(ckpt_root: Path, tmp: Path, step: int, trainer_state: dict, keep: int = 3, tokenizer=None) -> Path:
    """Complete the checkpoint in `tmp` (tokenizer, trainer state), fsync it, rename it to step_<step> and point
    `latest` at it; a kill at any moment leaves the previous checkpoint intact and `latest` whole."""
    final = ckpt_root / f"step_{step}"
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    save_trainer_state(tmp, trainer_state)
    _fsync_tree(tmp)
    if final.exists():  # an unpublished copy from a killed attempt: set aside, never half-deleted
        aside = ckpt_root / f".old_step_{step}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(tmp, final)
    _unfold_copied_latest(ckpt_root)
    link_tmp = ckpt_root / ".latest.tmp"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(final.name, link_tmp)  # relative: the run folder can be moved
    os.replace(link_tmp, ckpt_root / LATEST)
    _prune(ckpt_root, keep, final)
    return final


def check_publishable(model, step: int, ckpt_root: Path) -> None:
    """Every tensor finite (embedding rows the data never reaches included) before step_N can become
    `latest`: a NaN checkpoint there would make every later --resume refuse."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            good = latest_checkpoint(ckpt_root.parent)
            raise SpectraError(f"step {step}: {name} holds NaN/Inf, so no checkpoint was published; last finite "
                               f"checkpoint: {good or 'none'} (lower --lr or check the data)")


def _unfold_copied_latest(ckpt_root: Path) -> None:
    """A `latest` that is a real folder (a run copied with shutil.copytree / cp -L) becomes the step_N
    folder it is a copy of (or, when step_N is there too, goes), so the symlink can be published."""
    latest = ckpt_root / LATEST
    if latest.is_symlink() or not latest.is_dir():
        return
    step = checkpoint_step_of(latest)
    if step is None:  # not a checkpoint of ours: keep it, under a name that says so
        os.replace(latest, ckpt_root / f"latest.unknown.{time.time_ns()}")
        return
    twin = ckpt_root / f"step_{step}"
    if not twin.exists():
        os.replace(latest, twin)
        return
    aside = ckpt_root / f".old_latest_{time.time_ns()}"
    os.replace(latest, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _prune(ckpt_root: Path, keep: int, current: Path) -> None:
    if keep <= 0:
        return
    step = int(current.name.split("_")[1])
    done = sorted(
        (p for p in ckpt_root.glob("step_*") if p.is_dir() and int(p.name.split("_")[1]) < step),
        key=lambda p: int(p.name.split("_")[1]),
    )
    for old in done[: max(0, len(done) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def load_weights(model, ckpt: Path) -> None:
    files = sorted(ckpt.glob("*.safetensors"))
    files = [f for f in files if f.name != STATE_TENSORS]
    if not files:
        raise SpectraError(f"{ckpt} has no safetensors weights")
    state = {}
    for f in files:
        try:
            state.update(load_file(f))
        except Exception as e:  # noqa: BLE001
            raise SpectraError(f"cannot read {f} ({type(e).__name__}: {e})") from None
    check_finite(state.items(), ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied weight (BERT's MLM decoder = its word embeddings) is saved once, under its other name
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    saved_as = {name: group for group in names.values() for name in group}
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")
               and not any(n in state for n in saved_as.get(m, ()))]
    if missing or unexpected:
        raise SpectraError(
            f"checkpoint {ckpt} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
