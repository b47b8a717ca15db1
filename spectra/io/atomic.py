"""Files that are whole or absent: atomic replace with fsync (a kill leaves the old file or the new
one), and JSON objects read with one clear error."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from spectra.errors import SpectraError


def read_json(path: str | Path) -> dict:
    """A JSON object file a run holds (rank maps, configs); anything else is one error line."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpectraError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise SpectraError(f"{path} does not hold a JSON object")
    return obj


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` by `data` in one step: a reader or a kill sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself is durable, not just the bytes
    finally:
        os.close(fd)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def _to_json(obj) -> str:
    return json.dumps(obj, default=str, sort_keys=True)


def _jsonable(v):
    try:
        json.dumps(v)
        return v
    except TypeError:
        return json.loads(_to_json(v))
