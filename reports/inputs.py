"""Everything a report reads from `runs/<id>/`, each piece optional.

A report is built while producers may still be missing (analysis not run yet, no finetuning),
so every loader returns None for an absent input instead of raising. Inputs that exist but
cannot be read are kept as an error string and shown in their section (one broken file should
not hide the rest of the report).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import xarray as xr

from spectra.errors import SpectraError
from spectra.io.analysis_store import read_analysis
from spectra.io.atomic import read_json
from spectra.io.runs import run_dir_of
from spectra.io.snapshots import open_run

ANALYSES = ("spectrum", "grad_subspace", "hessian_gap", "hessian_density", "hessian_alignment", "hessian_drift",
            "sweep", "claims")
# what producers write into a run folder: a folder holding any of these is reported on as it is
OUTPUTS = ("snapshots.zarr", "analysis.zarr", "ranks", "eval.jsonl", "finetune", "metrics.jsonl", "run_config.json")


@dataclass
class RunInputs:
    """The parsed inputs of one run folder; None means "not produced yet"."""

    root: Path
    snapshots: object | None = None          # spectra.io.snapshots.Run
    analysis: dict[str, xr.Dataset] = field(default_factory=dict)
    rank_maps: dict[str, dict] = field(default_factory=dict)   # file stem -> rank map JSON
    evals: list[dict] | None = None
    finetune: dict[str, dict] = field(default_factory=dict)     # folder name -> metrics.json
    metrics: list[dict] | None = None                           # metrics.jsonl rows
    run_config: dict = field(default_factory=dict)              # pretraining settings (run_config.json)
    problems: dict[str, str] = field(default_factory=dict)      # input name -> why it was unreadable

    def empty(self) -> bool:
        return (self.snapshots is None and not self.analysis and not self.rank_maps and self.evals is None
                and not self.finetune and self.metrics is None and not self.problems and not self.run_config)

    def rank_map_of(self, model) -> dict | None:
        """The rank map a compressed model folder (`compressed/<map name>`) was made from, if the run has it."""
        return self.rank_maps.get(Path(str(model or "")).name)

    def pretrain_config(self) -> dict:
        """The pretraining settings: run_config.json, else the ones the snapshot store recorded."""
        if self.run_config:
            return self.run_config
        cfg = self.snapshots.attrs.get("config") if self.snapshots is not None else None
        if isinstance(cfg, str):
            try:
                cfg = json.loads(cfg)
            except json.JSONDecodeError:
                cfg = None
        return cfg if isinstance(cfg, dict) else {}


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """Rows of a JSON-lines file and the number of lines that did not parse (e.g. a line cut
    short by a crash mid-write) -- those are skipped, not fatal."""
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def report_folder(path: str | Path) -> Path:
    """The folder a report is about: `path` itself when it holds run outputs (a run, possibly partial, or
    the folder of a checkpoint series' analysis), else the run that a checkpoint, compressed model or
    snapshots.zarr inside it belongs to (io.runs.run_dir_of). A missing path is never looked up
    on the hub: a report reads local files only."""
    p = Path(path)
    if not p.exists():
        raise SpectraError(f"no run folder at {path}; pass runs/<id> (or a checkpoint inside it)")
    if p.is_file():
        raise SpectraError(f"{path} is a file; pass a run folder (runs/<id>) or a checkpoint inside it")
    if p.is_dir() and any((p / name).exists() for name in OUTPUTS):
        return p
    if (p / "config.json").is_file() or p.suffix == ".zarr":  # the report reads the run's files, not the model
        run = run_dir_of(p)
        if run is None:
            raise SpectraError(f"{path} lies in no run folder, so there is nothing to report; pass runs/<id>")
        return run
    return p


def load_run(path: str | Path) -> RunInputs:
    """Read every report input that exists under the run folder `path` names (`report_folder`)."""
    root = report_folder(path)
    if not root.is_dir():
        raise SpectraError(f"no run folder at {path}; pass runs/<id> (or a checkpoint inside it)")
    inp = RunInputs(root=root)
    _guard(inp, "snapshots", lambda: _load_snapshots(inp))
    for name in ANALYSES:
        _guard(inp, name, lambda name=name: _load_analysis(inp, name))
    for f in sorted((root / "ranks").glob("*.json")):
        _guard(inp, f"ranks/{f.name}", lambda f=f: inp.rank_maps.__setitem__(f.stem, read_json(f)))
    if (root / "eval.jsonl").is_file():
        _guard(inp, "eval.jsonl", lambda: setattr(inp, "evals", read_jsonl(root / "eval.jsonl")[0]))
    for f in sorted((root / "finetune").glob("*/metrics.json")):
        _guard(inp, f"finetune/{f.parent.name}", lambda f=f: inp.finetune.__setitem__(f.parent.name, read_json(f)))
    if (root / "metrics.jsonl").is_file():
        _guard(inp, "metrics.jsonl", lambda: setattr(inp, "metrics", read_jsonl(root / "metrics.jsonl")[0]))
    if (root / "run_config.json").is_file():
        _guard(inp, "run_config.json", lambda: setattr(inp, "run_config", read_json(root / "run_config.json")))
    if inp.empty():
        raise SpectraError(f"{path} holds no run outputs yet (no snapshots.zarr, analysis.zarr, ranks/, "
                           "eval.jsonl, finetune/ or metrics.jsonl); run `spectra pretrain` first")
    return inp


def _guard(inp: RunInputs, name: str, load) -> None:
    try:
        load()
    except SpectraError as e:
        inp.problems[name] = str(e)


def _load_snapshots(inp: RunInputs) -> None:
    if (inp.root / "snapshots.zarr").is_dir():
        inp.snapshots = open_run(inp.root)


def _load_analysis(inp: RunInputs, name: str) -> None:
    store = inp.root / "analysis.zarr"
    # absent group = not computed yet; a present but unreadable one is a problem worth showing (a writer
    # killed between the two renames of a swap leaves the group as .old-<name>; read_analysis finds it)
    if (store / name / "zarr.json").is_file() or (store / f".old-{name}" / "zarr.json").is_file():
        inp.analysis[name] = read_analysis(store, name)
