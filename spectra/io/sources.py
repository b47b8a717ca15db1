"""The one input resolver: a string (or path) becomes a typed `Source`.

Every command and every API call that accepts a path goes through `resolve()`:

    run          runs/<id>                      its snapshots.zarr and its newest complete checkpoint
    checkpoint   a save_pretrained folder       (also runs/<id>/checkpoints/step_N, .../latest)
    compressed   a folder `spectra compress` wrote (spectra_rank_map.json beside the weights)
    snapshots    a bare snapshots.zarr
    hub          `org/name` or `org/name@revision`, downloaded into the HF cache (one line when offline)
    series       several of the above, or a quoted glob (`'ckpts/step*'`): one member per step

A Source knows its model folder, its run folder, its snapshot store, its training step, the default
analysis store, and the tokenizer rule (`Source.tokenizer_name`): the `--tokenizer` given, refused
when it differs from the one saved with the model; else the one saved with the model; else the one
the run was pretrained with (run_config.json); else t5-base (GaLore's), checked against the model's
vocabulary by whoever loads it.

Every model folder is validated (spectra.models.validate.validate_checkpoint: config, every tensor
present with its shape and a floating dtype, readable files) before anything uses it: at once for a
checkpoint, compressed or hub input, and for a series, whose members must also be one architecture
with one set of shapes; for a run or a snapshot store, whose analyses may need no model, when a
command asks for its model (`Source.need_model`). Validation is cached, so resolving again is free.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import huggingface_hub

from spectra.data import load_tokenizer, tokenizer_digest
from spectra.errors import SpectraError
from spectra.io.atomic import read_json
from spectra.io.runs import checkpoint_of_latest, checkpoint_step_of, run_dir_of
from spectra.models.validate import check_series, validate_checkpoint

Kind = Literal["run", "checkpoint", "compressed", "snapshots", "hub", "series"]
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(?:@[\w./-]+)?")
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.jinja"]  # no .bin / .h5 duplicates
STEP_RE = re.compile(r"(?:^|[^a-z])step[_-]?(\d+)$", re.IGNORECASE)
RANK_MAP_FILE = "spectra_rank_map.json"  # what marks a compressed folder (spectra.compression.rankmap)
DEFAULT_TOKENIZER = "t5-base"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model")


@dataclass(frozen=True)
class Source:
    """What one input names. `model_dir` is None only for a bare snapshot store."""

    text: str
    kind: Kind
    model_dir: Path | None = None
    run_dir: Path | None = None
    snapshots: Path | None = None
    step: int | None = None
    members: tuple[Source, ...] = field(default=(), repr=False)
    hub_name: str | None = None

    @property
    def compressed(self) -> bool:
        return self.model_dir is not None and (self.model_dir / RANK_MAP_FILE).is_file()

    @property
    def analysis_store(self) -> Path:
        """Default analysis store: `<run>/analysis.zarr` inside a run, `./<org>/<name>/analysis.zarr` for a
        hub model, next to a bare snapshot store, else inside the model folder (a series: its common folder)."""
        if self.kind == "series":
            runs = {m.run_dir for m in self.members}
            if len(runs) == 1 and None not in runs:
                return next(iter(runs)) / "analysis.zarr"
            hubs = {m.hub_name.partition("@")[0] for m in self.members if m.hub_name}
            if hubs:
                return Path(sorted(hubs)[0]) / "analysis.zarr"
            common = os.path.commonpath([str(m.model_dir.resolve()) for m in self.members])
            return Path(common) / "analysis.zarr"
        if self.run_dir is not None:
            return self.run_dir / "analysis.zarr"
        if self.hub_name:
            return Path(self.hub_name.partition("@")[0]) / "analysis.zarr"
        if self.kind == "snapshots":
            return self.snapshots.parent / "analysis.zarr"
        return self.model_dir / "analysis.zarr"

    def need_model(self, what: str = "this command") -> Path:
        """The model folder, validated; one line when there is none."""
        if self.model_dir is None:
            raise SpectraError(f"{self.text} holds no model checkpoint, which {what} needs "
                               "(pass a checkpoint folder, a run with checkpoints or a hub name)")
        validate_checkpoint(self.model_dir)
        return self.model_dir

    def saved_tokenizer(self) -> Path | None:
        """The folder holding the tokenizer saved with the model, if any."""
        if self.model_dir is not None and any((self.model_dir / f).is_file() for f in TOKENIZER_FILES):
            return self.model_dir
        return None

    def tokenizer_name(self, given: str | None = None) -> str:
        """The tokenizer rule (module docstring). A given one that differs from the saved one is refused
        when the tokenizer is loaded (`load_source_tokenizer`), since telling needs both loaded."""
        if given:
            return given
        saved = self.saved_tokenizer()
        if saved is not None:
            return str(saved)
        run = self.run_dir
        if run is not None and (run / "run_config.json").is_file():
            tok = read_json(run / "run_config.json").get("tokenizer")
            if tok:
                return str(tok)
        return DEFAULT_TOKENIZER


def checkpoint_step(path: str | Path) -> int | None:
    """The training step in a checkpoint folder's name (step1000, step_1000, pythia-160m-step1000)
    or a hub revision (EleutherAI/pythia-160m@step1000)."""
    m = STEP_RE.search(re.split(r"[/@]", str(path).rstrip("/"))[-1])
    return int(m.group(1)) if m else None


def is_snapshot_store(path: Path) -> bool:
    return (path / "snapshots.zarr").is_dir() or (path.suffix == ".zarr" and path.is_dir()
                                                   and (path / "zarr.json").is_file() and path.name != "analysis.zarr")


def expand_paths(args: Sequence[str | Path]) -> list[str]:
    """Arguments as given, with unexpanded globs (quoted `runs/pythia/step*`) expanded and sorted."""
    out = []
    for a in map(str, args):
        if not Path(a).exists() and any(ch in a for ch in "*?["):
            hits = sorted(glob.glob(a))
            if not hits:
                raise SpectraError(f"no folder matches {a!r}")
            out += hits
        else:
            out.append(a)
    return out


def hub_checkpoint(name: str) -> Path:
    """A hub model `org/name` or `org/name@revision`, downloaded (config, safetensors, tokenizer) into the
    HF cache; its local folder. Offline (HF_HUB_OFFLINE=1) only the cache is asked: one fast line."""
    repo, _, revision = name.partition("@")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(huggingface_hub.snapshot_download(repo, revision=revision or None, allow_patterns=HUB_FILES,
                                      local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: one line naming the model
        why = "HF_HUB_OFFLINE is set and it is not in the cache" if offline else (
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise SpectraError(f"{name} is no local folder, and the hub did not provide it ({why})") from None


def _one(text: str) -> Source:
    """The Source one input names; a checkpoint, compressed or hub model folder is validated here."""
    source = _locate(text)
    if source.kind in ("checkpoint", "compressed", "hub"):
        validate_checkpoint(source.model_dir)
    return source


def _locate(text: str) -> Source:
    p = Path(text)
    if not p.exists():
        if HUB_NAME.fullmatch(text):
            folder = hub_checkpoint(text)
            return Source(text, "hub", model_dir=folder, step=checkpoint_step(text), hub_name=text)
        raise SpectraError(f"{text} does not exist (expected a run folder, a checkpoint or compressed folder, "
                           "a snapshots.zarr or a hub name org/name[@revision])")
    if p.suffix == ".zarr" and is_snapshot_store(p):
        run = run_dir_of(p)
        ckpt = checkpoint_of_latest(run / "checkpoints", resumable=False) if run else None
        return Source(text, "snapshots", model_dir=ckpt, run_dir=run, snapshots=p)
    ckpt = checkpoint_of_latest(p / "checkpoints", resumable=False)
    if ckpt is not None or (p / "run_config.json").is_file() or (p / "snapshots.zarr").is_dir():
        snaps = p / "snapshots.zarr"
        return Source(text, "run", model_dir=ckpt, run_dir=p.resolve(), snapshots=snaps if snaps.is_dir() else None,
                      step=_step_of_checkpoint(ckpt) if ckpt else None)
    if (p / "config.json").is_file():
        run = run_dir_of(p)
        kind: Kind = "compressed" if (p / RANK_MAP_FILE).is_file() else "checkpoint"
        snaps = run / "snapshots.zarr" if run else None
        return Source(text, kind, model_dir=p, run_dir=run, snapshots=snaps if snaps and snaps.is_dir() else None,
                      step=_step_of_checkpoint(p))
    if p.is_dir():
        raise SpectraError(f"{p} holds no model checkpoint (expected config.json, checkpoints/ or snapshots.zarr)")
    raise SpectraError(f"{p} is a file; pass a folder (a run, a checkpoint or a snapshots.zarr)")


def _step_of_checkpoint(folder: Path) -> int | None:
    """A checkpoint's training step (step_N, trainer_state.json, a step in its name); None for a model with
    no training step (a compressed folder, a plain save_pretrained folder)."""
    step = checkpoint_step_of(folder)
    return step if step is not None else checkpoint_step(folder.resolve())


def resolve(spec: str | Path | Sequence[str | Path], *, steps: Sequence[int] | None = None) -> Source:
    """The Source a command or API input names (module docstring). Several paths, or a glob, make a
    series whose members are ordered by step: from their names (step<N>, step_<N>, @step<N>), or
    `steps` given in the same order."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not items or any(str(i) == "" for i in items):
        raise SpectraError("missing the input: pass a run, a checkpoint folder, a snapshots.zarr or a hub name")
    texts = expand_paths(items)
    if len(texts) == 1 and not (steps and len(items) == 1 and any(ch in str(items[0]) for ch in "*?[")):
        return _one(texts[0])
    members = [_one(t) for t in texts]
    bad = [m.text for m in members if m.model_dir is None or m.kind == "snapshots"]
    if bad:
        raise SpectraError(f"a series is checkpoint folders or hub revisions; {bad[0]} is not (pass one run or "
                           "snapshots.zarr on its own)")
    if steps:
        if len(steps) != len(members):
            raise SpectraError(f"--steps gives {len(steps)} step(s) for {len(members)} checkpoint folder(s)")
        got = list(steps)
    else:
        got = [checkpoint_step(m.text) if checkpoint_step(m.text) is not None else m.step for m in members]
        unnamed = [m.text for m, s in zip(members, got) if s is None]
        if unnamed:
            raise SpectraError(f"cannot tell the training step of {unnamed[0]}: name the folders step<N> / "
                               "step_<N> or pass --steps in the same order")
    if len(set(got)) != len(got):
        raise SpectraError(f"two checkpoints share a step: {sorted(got)}")
    ordered = sorted((Source(m.text, m.kind, m.model_dir, m.run_dir, m.snapshots, s, (), m.hub_name)
                      for m, s in zip(members, got)), key=lambda m: m.step)
    check_series([(m.text, m.need_model("a series")) for m in ordered])  # one architecture, one set of shapes
    return Source(" ".join(texts), "series", members=tuple(ordered))


def find_checkpoint(path: str | Path) -> Path:
    """The model folder `path` names (a checkpoint, a run's newest checkpoint, a hub model)."""
    return resolve(path).need_model()


def analysis_store_for(path: str | Path) -> Path:
    """The default analysis store of what `path` names, without touching the hub."""
    p = Path(path)
    run = run_dir_of(p)
    if run is not None:
        return run / "analysis.zarr"
    return (p.parent if p.suffix == ".zarr" else p) / "analysis.zarr"


def load_source_tokenizer(source: Source, given: str | None = None):
    """The tokenizer by the one rule; a given `--tokenizer` that differs from the one saved with the model is
    refused (it would score the wrong tokens)."""
    saved = source.saved_tokenizer()
    stored = None
    if saved is not None:
        try:
            stored = load_tokenizer(str(saved))
        except Exception as e:  # noqa: BLE001 - damaged or crafted files: one line
            raise SpectraError(f"cannot load the tokenizer saved in {saved} ({type(e).__name__})") from None
    if not given:
        return stored if stored is not None else load_tokenizer(source.tokenizer_name())
    tok = load_tokenizer(given)
    if stored is not None and tokenizer_digest(tok) != tokenizer_digest(stored):
        raise SpectraError(f"--tokenizer {given} is not the tokenizer saved with {saved}; "
                           "leave --tokenizer out to use the saved one")
    return tok
