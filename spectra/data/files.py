"""Local text: `--data` specs (files, globs, folders) -> a memory-mapped `datasets.Dataset` of documents.

json/jsonl(.gz) rows need a string "text" field; txt files are split into paragraphs; parquet needs a
string "text" column. A row whose "text" is null or not a string is refused with the file and row named
(tokenizing it would fail mid-run, or worse, score str(None)).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

from spectra.errors import SpectraError

_SUFFIX_BUILDER = {".json": "json", ".jsonl": "json", ".gz": "json", ".txt": "text", ".parquet": "parquet"}


def expand_files(spec: str | list[str], flag: str = "--data") -> list[str]:
    """Files named by paths, globs or folders (recursively), sorted for determinism (`flag`: the option
    that named them, for the error line)."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    files: list[str] = []
    for s in specs:
        for part in str(s).split(","):
            part = part.strip()
            if not part:
                continue
            if os.path.isdir(part):
                # folder: every data file below it, minus metadata files (MANIFEST.jsonl, README)
                hits = [str(f) for f in Path(part).rglob("*")
                        if f.is_file() and _builder(str(f)) and not f.name.upper().startswith(("MANIFEST", "README"))]
            else:
                hits = glob.glob(part, recursive=True)
            if not hits:
                raise SpectraError(f"{flag} {part!r} matches no files")
            files += hits
    files = sorted(set(files))
    builders = {_builder(f) for f in files}
    if None in builders:
        bad = [f for f in files if _builder(f) is None][:3]
        raise SpectraError(f"unsupported data file type: {bad} (use json/jsonl(.gz)/txt/parquet)")
    if len(builders) > 1:
        raise SpectraError(f"{flag} mixes file types {sorted(builders)}; give one kind at a time")
    return files


def _builder(path: str) -> str | None:
    name = path.lower()
    if name.endswith((".jsonl.gz", ".json.gz")):
        return "json"
    if name.endswith(".txt.gz"):
        return "text"
    return _SUFFIX_BUILDER.get(Path(name).suffix) if not name.endswith(".gz") else None


def load_local_docs(spec: str | list[str], flag: str = "--data"):
    """A map-style `datasets.Dataset` with a string "text" column from local files."""
    files = expand_files(spec, flag)
    builder = _builder(files[0])
    datasets.disable_progress_bars()
    try:
        kw = {"sample_by": "paragraph"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", **kw)
    except Exception as e:  # noqa: BLE001 - corrupt/unreadable/empty files: one line
        bad = _first_bad_row(files, builder, flag)  # files whose "text" types disagree fail here
        if bad:
            raise SpectraError(bad) from None
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise SpectraError(f"cannot read {flag} {spec} as docs: {msg}") from None
    if "text" not in ds.column_names:
        raise SpectraError(f"{flag} {spec} has no 'text' field (columns: {ds.column_names})")
    if len(ds) == 0:
        raise SpectraError(f"{flag} {spec} holds no docs (empty files)")
    text = ds.features["text"]
    if getattr(text, "dtype", None) not in ("string", "large_string") or ds.data.column("text").null_count:
        raise SpectraError(_first_bad_row(files, builder, flag)
                           or f"{flag} {spec}: the 'text' field holds {text} values, not strings")
    if builder == "json" and len(files) > 1:
        # across files datasets casts to the first file's types: a later file's 5 became "5" and its
        # {"a": 1} the string '{"a":1}'. Each file is checked on its own (memoized; ~1 s per 40 MB gz).
        for f in files:
            if not _json_text_ok(f):
                raise SpectraError(_first_bad_row([f], builder, flag)
                                   or f"{flag} {f}: its 'text' values are not all strings")
    return ds.select_columns(["text"])


_TEXT_ONLY = pj.ParseOptions(explicit_schema=pa.schema([("text", pa.string())]), unexpected_field_behavior="ignore")
_CHECKED: set[tuple] = set()


def _json_text_ok(path: str) -> bool:
    """Whether every row of a JSON file has a string (or no) "text" (pyarrow for JSON lines; a JSON array
    file, which pyarrow does not read, row by row)."""
    st = os.stat(path)
    memo = (path, st.st_size, st.st_mtime_ns)
    if memo in _CHECKED:
        return True
    try:
        ok = pj.read_json(path, parse_options=_TEXT_ONLY).column("text").null_count == 0
    except pa.ArrowInvalid:
        ok = _first_bad_row([path], "json", "") is None
    if ok:
        _CHECKED.add(memo)
    return ok


def docs_from_texts(texts) -> datasets.Dataset:
    """Documents given in memory (a list of strings) as the same kind of Dataset `load_local_docs` returns."""
    texts = list(texts)
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise SpectraError(f"text {bad} is {_what(texts[bad])}, not a string")
    if not texts:
        raise SpectraError("no texts given")
    return datasets.Dataset.from_dict({"text": texts})


def _what(v) -> str:
    return "null" if v is None else f"{type(v).__name__} {str(v)[:40]!r}"


def _first_bad_row(files: list[str], builder: str, flag: str) -> str | None:
    """The error line for the first row whose "text" is missing, null or not a string (None when every row is
    fine). Only read on the way to an error, so it may be slow."""
    if builder == "text":
        return None
    for f in files:
        try:
            for i, row in _rows(f, builder):
                if not isinstance(row, dict) or "text" not in row:
                    return f"{flag} {f} row {i + 1} has no \"text\" field; fix or drop that row"
                if not isinstance(row["text"], str):
                    return (f"{flag} {f} row {i + 1}: \"text\" is {_what(row['text'])}, not a string; "
                            "fix or drop that row")
        except (OSError, ValueError, EOFError):  # unreadable: load_dataset's own message says more
            continue
    return None


def _rows(f: str, builder: str):
    if builder == "parquet":
        col = pq.read_table(f, columns=["text"]).column("text").to_pylist()
        yield from ((i, {"text": v}) for i, v in enumerate(col))
        return
    opener = gzip.open if f.lower().endswith(".gz") else open
    with opener(f, "rt", encoding="utf-8") as fh:
        first = fh.read(1)
        fh.seek(0)
        if first == "[":  # one JSON array of rows rather than JSON lines
            yield from enumerate(json.load(fh))
            return
        for i, line in enumerate(fh):
            if line.strip():
                yield i, json.loads(line)


def split_docs(ds, val_fraction: float, seed: int):
    """Deterministic held-out split of a local corpus: (train_indices, val_indices)."""
    n = len(ds)
    if n < 2:
        raise SpectraError(f"need at least 2 documents to hold out a validation split, got {n}")
    perm = np.random.default_rng(seed + 1_000_003).permutation(n)
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (memoized per path, size and mtime within one process)."""
    st = os.stat(path)
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def data_fingerprint(spec: str | list[str]) -> list[list]:
    """[[file, size], ...] of `--data`: what a resume compares to notice that the data changed."""
    return [[f, os.path.getsize(f)] for f in expand_files(spec)]


def shared_data() -> Path:
    """The offline data folder: $SPECTRA_DATA, else shared/data next to the checkout (or the current folder's).
    `spectra pipeline` presets and `spectra sweep`'s default eval sets read it."""
    if os.environ.get("SPECTRA_DATA"):
        return Path(os.environ["SPECTRA_DATA"])
    for base in (Path(__file__).resolve().parents[3], Path.cwd().parent, Path.cwd()):
        if (base / "shared" / "data").is_dir():
            return base / "shared" / "data"
    raise SpectraError("cannot find shared/data next to the checkout; pass the data files to the command")
