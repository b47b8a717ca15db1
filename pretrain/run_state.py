"""What a pretraining run keeps besides checkpoints and snapshots: metrics rows, the run config with
its history of starts and resumes, the resume check, and clean exits on SIGTERM / Ctrl-C.

Every file here changes by append (metrics rows, one `write` each, flushed) or by writing a new
file and renaming it over the old one (truncation on resume, run_config.json), so a kill at any
moment leaves the old content or the new one, never a mix and never less than was committed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from spectra.errors import SpectraError, Terminated
from spectra.io.atomic import atomic_write_bytes, atomic_write_json
from spectra.io.runs import LOCK, has_checkpoint_folders
from spectra.io.snapshots import _committed

METRICS = "metrics.jsonl"
RUN_CONFIG = "run_config.json"
# settings that change which weights a run produces; --resume refuses to change them silently
TRAJECTORY = ("model", "data", "val_data", "val_fraction", "tokenizer", "seq_len", "batch_size", "micro_batch",
              "steps", "lr", "warmup", "min_lr_ratio", "weight_decay", "betas", "grad_clip", "seed", "data_files",
              "cpu_bf16")


def read_rows(path: Path) -> list[dict]:
    """Metrics rows; a torn last line (a kill mid-append) is skipped, never an error."""
    rows = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget rows logged after the checkpoint (they are recomputed identically):
    the kept rows go to a new file that replaces the old one in one rename."""
    if not path.is_file():
        return
    rows = [r for r in read_rows(path) if r["step"] <= step]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def config_changes(saved: dict, cfg: dict) -> dict:
    """{key: [saved, now]} for every trajectory setting that differs."""
    out = {}
    for k in TRAJECTORY:
        a, b = saved.get(k), cfg.get(k)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = (
                [list(x) if isinstance(x, tuple) else x for x in a],
                [list(x) if isinstance(x, tuple) else x for x in b],
            )
        if a != b and k in saved:
            out[k] = [a, b]
    return out


def check_resume_config(saved: dict, cfg: dict, allow: bool) -> dict:
    changes = config_changes(saved, cfg)
    if changes and not allow:
        diff = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in changes.items())
        raise SpectraError(
            f"--resume would change the run's trajectory ({diff}); "
            "pass --allow-config-change to accept (it is recorded in run_config.json)"
        )
    return changes


def _short(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


def read_run_config(path: Path) -> dict:
    """run_config.json as a dict; {} when it is missing or unreadable (it is a record, not an input)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def record_run_config(run_dir: Path, cfg: dict, event: str, step: int, changes: dict | None = None) -> None:
    """run_config.json: the settings in force, plus `history` (every start, resume, restart)."""
    path = run_dir / RUN_CONFIG
    history = read_run_config(path).get("history")
    history = history if isinstance(history, list) else []
    entry = {"event": event, "step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if changes:
        entry["changed"] = changes
    atomic_write_json(path, {**cfg, "history": [*history, entry]})


def start_over(run_dir: Path) -> None:
    """Empty a run folder (keeping its lock): everything is first renamed into one trash folder,
    so a kill midway leaves either the old run or nothing of it, never a half-deleted store."""
    trash = run_dir / ".trash"
    trash.mkdir(exist_ok=True)
    for p in list(run_dir.iterdir()):
        if p.name not in (LOCK, ".trash"):
            os.replace(p, trash / f"{p.name}.{time.time_ns()}")
    shutil.rmtree(trash, ignore_errors=True)


def refuse_restart(run_dir: Path, save_every: int) -> None:
    """`--resume` found no complete checkpoint. Starting over is only right for a run killed before its
    first checkpoint (all it has is re-made bit for bit); anything else would delete a run's data, so it
    is refused, naming what is there."""
    ckpts = run_dir / "checkpoints"
    if has_checkpoint_folders(ckpts):
        names = ", ".join(sorted(p.name for p in ckpts.iterdir())[:4])
        raise SpectraError(f"--resume: {ckpts} holds no complete checkpoint ({names}); nothing was deleted; "
                           "repair or remove those folders, or pass --overwrite to start the run over")
    steps = [r.get("step", 0) for r in read_rows(run_dir / METRICS)] if (run_dir / METRICS).is_file() else []
    store = run_dir / "snapshots.zarr"
    try:
        snaps = _committed(store) if _holds_anything(store) else []
    except Exception:  # noqa: BLE001 - an unreadable store is data too
        snaps = [float("inf")]
    last = max([*steps, *snaps], default=0)
    if last > max(save_every, 0):
        raise SpectraError(f"--resume: {run_dir} has no checkpoint to continue from, but holds training up to step "
                           f"{last} (metrics/snapshots); nothing was deleted; pass --overwrite to start it over")


def _holds_anything(store: Path) -> bool:
    """A store folder with more than temporary files: a kill while it was being created leaves only a hidden
    `.zarr.json.<pid>.tmp`, which is no snapshot (and no reason to refuse the restart)."""
    return store.is_dir() and any(not p.name.startswith(".") for p in store.iterdir())


def has_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.name not in (LOCK, ".trash") for p in run_dir.iterdir())


@contextmanager
def terminate_as_exception():
    """SIGTERM (a scheduler's preemption, `kill`) unwinds like Ctrl-C does: `finally` blocks run,
    the snapshot in flight is committed, and the CLI exits 143 (Ctrl-C: 130)."""

    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test thread): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def config_dict(cfg) -> dict:
    return {k: v for k, v in asdict(cfg).items()}
