"""Run folders: ids, the `latest` checkpoint pointer, the run lock, and outputs that never clobber.

A run is `runs/<id>/` (run_config.json, metrics.jsonl, snapshots.zarr, checkpoints/, analysis.zarr,
ranks/, eval.jsonl, report.html, ...). Every command that writes into a run holds
`runs/<id>/.lock` (an `fcntl.flock`, released by the kernel when the process dies, so a kill -9
never leaves a stale lock) for as long as it writes.
"""

from __future__ import annotations

import fcntl
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


def checkpoint_of_latest(ckpt_root: Path) -> Path | None:
    """The folder `checkpoints/latest` names: a symlink (this version) or a text file (older runs)."""
    pointer = ckpt_root / LATEST
    if pointer.is_symlink():
        return ckpt_root / os.readlink(pointer)
    if pointer.is_file():
        return ckpt_root / pointer.read_text().strip()
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when it has none yet."""
    path = checkpoint_of_latest(run_dir / "checkpoints")
    if path is None:
        return None
    if not (path / "trainer_state.json").is_file() and not (path / "trainer_state.pt").is_file():
        raise SpectraError(f"{run_dir / 'checkpoints' / LATEST} names {path.name}, which is incomplete; "
                           "remove it or point latest elsewhere")
    return path


def run_dir_of(path: str | Path) -> Path | None:
    """The run folder (`runs/<id>`) that `path` is or lies inside — a checkpoint, a snapshot store,
    a compressed model or a finetune output — recognised by what `spectra pretrain` writes there."""
    p = Path(path).resolve()
    for cand in (p, *p.parents):
        if ((cand / "run_config.json").is_file() or (cand / "snapshots.zarr").is_dir()
                or checkpoint_of_latest(cand / "checkpoints") is not None):
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
            raise SpectraError(f"{run_dir} is in use by {holder}; wait for it to finish "
                               "(or use another --run-id)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"spectra {command} (pid {os.getpid()})".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def check_own_output(path: str | Path, owned=None, overwrite: bool = False, what: str = "--out") -> Path:
    """An output a command creates, or replaces/extends only if it is its own product (`owned(path)`
    says so, e.g. an HTML report or a jsonl of eval rows; `owned=None`: nothing that exists is).
    A missing path or an empty folder is always fine; anything else needs `--overwrite`."""
    p = Path(path)
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
    import json

    obj = json.loads(p.read_text())
    return isinstance(obj, dict) and "components" in obj and "method" in obj


def is_finetune_dir(p: Path) -> bool:
    """spectra finetune output folder"""
    import json

    return p.is_dir() and "method" in json.loads((p / "metrics.json").read_text())


def input_path(path: str | None, alias: str | None, flag: str) -> str:
    """Every command takes its input as a positional PATH; `--ckpt`/`--model` stay as aliases."""
    if path and alias and path != alias:
        raise SpectraError(f"give the input once: as PATH or as {flag}, not both")
    if not (path or alias):
        raise SpectraError(f"missing the input: pass PATH (or {flag} PATH)")
    return str(path or alias)
