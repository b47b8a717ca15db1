"""Run folders: ids, the `latest` checkpoint pointer, the run lock, and outputs that never clobber.

A run is `runs/<id>/` (run_config.json, metrics.jsonl, snapshots.zarr, checkpoints/, analysis.zarr,
ranks/, eval.jsonl, report.html, ...). Every command that writes into a run holds
`runs/<id>/.lock` (an `fcntl.flock`, released by the kernel when the process dies, so a kill -9
never leaves a stale lock) for as long as it writes.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

from spectra.errors import SpectraError

LATEST = "latest"
LOCK = ".lock"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def validate_run_id(run_id: str) -> str:
    """A run id is one plain folder name: no separators, no `..`, not absolute, not hidden."""
    if not _RUN_ID.fullmatch(run_id or "") or ".." in run_id:
        raise SpectraError(f"--run-id {run_id!r} must be a plain folder name (letters, digits, '.', '_', '-'; "
                           "no '/', no '..', not starting with '.' or '-')")
    return run_id


def run_folder(runs_dir: str | Path, run_id: str) -> Path:
    """`runs_dir/run_id`, refused when that is a symlink: a run writes inside --runs-dir, never where a link
    points (the link may name another run, or a folder outside the runs)."""
    path = Path(runs_dir) / validate_run_id(run_id)
    if path.is_symlink():
        raise SpectraError(f"{path} is a symlink (to {os.readlink(path)}); a run folder must be a real folder "
                           "inside --runs-dir: remove the link or choose another --run-id")
    return path


_STEP_DIR = re.compile(r"step_(\d+)")


def is_complete_checkpoint(path: Path, resumable: bool = True) -> bool:
    """A published checkpoint: config and weights (and, for `resumable`, the trainer state) present, which
    is what save_checkpoint renames into place in one step."""
    if not (path.is_dir() and (path / "config.json").is_file()
            and ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())):
        return False
    # trainer_state.pt (pickled, older spectra) counts, so resume can refuse it by name
    return not resumable or (path / "trainer_state.json").is_file() or (path / "trainer_state.pt").is_file()


def checkpoint_step_of(path: Path) -> int | None:
    """The optimizer step a checkpoint folder holds: its name (step_N), else its trainer_state.json."""
    m = _STEP_DIR.fullmatch(path.name)
    if m:
        return int(m[1])
    try:
        doc = json.loads((path / "trainer_state.json").read_text())
        return int(dict(doc["state"]["__dict__"])["step"])  # pretrain/checkpoint.py's encoding of a dict
    except Exception:  # noqa: BLE001 - unreadable: not a usable checkpoint
        return None


def checkpoint_candidates(ckpt_root: Path, resumable: bool = True) -> list[tuple[int, Path]]:
    """Every complete checkpoint under `checkpoints/`, oldest first: the step_N folders and a `latest`
    that is a real folder (what shutil.copytree / cp -L make of the symlink)."""
    if not ckpt_root.is_dir():
        return []
    found: dict[int, Path] = {}
    latest = ckpt_root / LATEST
    if latest.is_dir() and not latest.is_symlink() and is_complete_checkpoint(latest, resumable):
        step = checkpoint_step_of(latest)
        if step is not None:
            found[step] = latest
    for p in ckpt_root.iterdir():
        if _STEP_DIR.fullmatch(p.name) and not p.is_symlink() and is_complete_checkpoint(p, resumable):
            found[int(p.name[5:])] = p  # a step_N folder wins over a copied `latest` of the same step
    return sorted(found.items())


def checkpoint_of_latest(ckpt_root: Path, resumable: bool = True) -> Path | None:
    """The checkpoint to continue from (or, `resumable=False`, to analyze): what `latest` names when that
    is complete (a symlink, or a text file in older runs), else the newest complete one, whether `latest`
    is a real folder (a copied run), dangling or missing. Never None while a complete checkpoint exists,
    so a run is never mistaken for one without checkpoints."""
    pointer = ckpt_root / LATEST
    target = None
    if pointer.is_symlink():
        target = ckpt_root / os.readlink(pointer)
    elif pointer.is_file():
        target = ckpt_root / pointer.read_text(errors="replace").strip()
    if target is not None and is_complete_checkpoint(target, resumable):
        return target
    cands = checkpoint_candidates(ckpt_root, resumable)
    return cands[-1][1] if cands else None


def has_checkpoint_folders(ckpt_root: Path) -> bool:
    """Anything that looks like a checkpoint, complete or not (step_N folders, a `latest` entry)."""
    if not ckpt_root.is_dir():
        return False
    return any(_STEP_DIR.fullmatch(p.name) or p.name == LATEST for p in ckpt_root.iterdir())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none yet."""
    return checkpoint_of_latest(run_dir / "checkpoints")


def run_dir_of(path: str | Path) -> Path | None:
    """The run folder (`runs/<id>`) that `path` is or lies inside — a checkpoint, a snapshot store,
    a compressed model or a finetune output — recognised by what `spectra pretrain` writes there."""
    p = Path(path).resolve()
    for cand in (p, *p.parents):
        if ((cand / "run_config.json").is_file() or (cand / "snapshots.zarr").is_dir()
                or checkpoint_of_latest(cand / "checkpoints", resumable=False) is not None):
            return cand
    return None


@contextmanager
def run_lock(run_dir: str | Path | None, command: str):
    """Hold `run_dir/.lock` exclusively while `command` writes into the run (no-op for None)."""
    if run_dir is None:
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            way = "wait for it to finish, or use another --run-id" if command == "pretrain" else \
                f"wait for it to finish, then run spectra {command} again"
            raise SpectraError(f"{run_dir} is in use by {holder}; {way}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"spectra {command} (pid {os.getpid()})".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def check_output_place(path: str | Path, what: str = "--out") -> Path:
    """The folder an output goes in must be one, or creatable: not under a regular file, no symlink loop."""
    p = Path(path)
    try:
        p.resolve()
    except (RuntimeError, OSError) as e:  # a symlink loop
        raise SpectraError(f"{what} {p} cannot be used ({e}); choose another path") from None
    above = p.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if above.exists() and not above.is_dir():
        raise SpectraError(f"{what} {p} lies under {above}, which is a file, not a folder; choose another path")
    return p


def check_own_output(path: str | Path, owned=None, overwrite: bool = False, what: str = "--out") -> Path:
    """An output a command creates, or replaces/extends only if it is its own product (`owned(path)`
    says so, e.g. an HTML report or a jsonl of eval rows; `owned=None`: nothing that exists is).
    A missing path or an empty folder is always fine; anything else needs `--overwrite`. The folder it goes
    in must be one, or creatable: not under a regular file, no symlink loop."""
    p = check_output_place(path, what)
    if overwrite or not p.exists() or (p.is_dir() and not any(p.iterdir())):
        return p
    if owned is None:
        raise SpectraError(f"{what} {p} already exists and is not empty; choose another path or pass --overwrite")
    try:
        ok = bool(owned(p))
    except Exception:  # noqa: BLE001 - unreadable means "not ours"
        ok = False
    if not ok:
        raise SpectraError(f"{what} {p} exists and is not a {_name(owned)}; choose another path "
                           "(or pass --overwrite where the command has it)")
    return p


def _name(owned) -> str:
    return (owned.__doc__ or "file this command writes").strip().splitlines()[0].rstrip(".")


def is_report(p: Path) -> bool:
    """spectra HTML report"""
    return p.is_file() and 'content="spectra report"' in p.read_text(errors="replace")[:4096]


def is_jsonl_of(key: str):
    def owned(p: Path) -> bool:
        first = p.read_text(errors="replace").splitlines()[:1]
        return p.is_file() and (not first or (first[0].startswith("{") and f'"{key}"' in first[0]))

    owned.__doc__ = f"jsonl of spectra rows with {key!r}"
    return owned


def is_analysis_store(p: Path) -> bool:
    """spectra analysis store (a Zarr folder)"""
    return p.is_dir() and (p / "zarr.json").is_file() and "spectra-analysis" in (p / "zarr.json").read_text()


def is_rank_map(p: Path) -> bool:
    """spectra rank map JSON"""
    obj = json.loads(p.read_text())
    return isinstance(obj, dict) and "components" in obj and "method" in obj


def is_finetune_dir(p: Path) -> bool:
    """spectra finetune output folder"""
    return p.is_dir() and "method" in json.loads((p / "metrics.json").read_text())


def input_path(path: str | None, alias: str | None, flag: str) -> str:
    """Every command takes its input as a positional PATH; `--ckpt`/`--model` stay as aliases."""
    if path and alias and path != alias:
        raise SpectraError(f"give the input once: as PATH or as {flag}, not both")
    if not (path or alias):
        raise SpectraError(f"missing the input: pass PATH (or {flag} PATH)")
    return str(path or alias)
