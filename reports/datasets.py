"""Which eval rows measured the same dataset, and what to call it on the page.

`spectra eval` records the `--data` argument as typed, so one file appears under several
spellings (`../shared/data/c4/x.jsonl.gz` from the repo, `/work/shared/data/c4/x.jsonl.gz` from a
script). Grouping by the raw string split one dataset into several lines with the same legend
name. Here two spellings are one dataset when, after normalizing `.`/`..`/separators, the path
parts of one end the parts of the other (and that ending is unambiguous and at least two parts
long, so a bare `c4` never swallows `/data/c4`). Labels are the shortest unique path endings.
"""

from __future__ import annotations

import posixpath


def _parts(path) -> tuple[str, ...]:
    p = posixpath.normpath(str(path).replace("\\", "/"))
    return tuple(x for x in p.split("/") if x not in ("", ".", ".."))


def _ends(long: tuple[str, ...], short: tuple[str, ...]) -> bool:
    return len(short) <= len(long) and long[len(long) - len(short):] == short


def dataset_keys(spellings) -> dict[str, str]:
    """{spelling: canonical spelling} -- the canonical one is the longest spelling of the dataset."""
    parts = {str(s): _parts(s) for s in spellings}
    canon: list[str] = []
    out: dict[str, str] = {}
    for s in sorted(parts, key=lambda s: (-len(parts[s]), s)):  # longest first: they become the keys
        p = parts[s]
        match = [c for c in canon if parts[c] == p or (len(p) >= 2 and _ends(parts[c], p))]
        if len(match) == 1:
            out[s] = match[0]
        else:  # new dataset, or a short ending shared by two datasets: keep it apart
            canon.append(s)
            out[s] = s
    return out


def dataset_labels(keys) -> dict[str, str]:
    """{canonical spelling: display label}: the last two path parts ("wikipedia/validation"), more
    where two datasets would otherwise share a label."""
    keys = sorted({str(k) for k in keys})
    parts = {k: _parts(k) or (k,) for k in keys}
    labels = {}
    for k in keys:
        n = min(2, len(parts[k]))
        while n < len(parts[k]) and any(o != k and _ends(parts[o], parts[k][-n:]) for o in keys):
            n += 1
        labels[k] = "/".join(parts[k][-n:])
    if len(set(labels.values())) < len(labels):  # equal endings all the way: fall back to the spelling
        labels = {k: k for k in keys}
    return labels


def dataset_label(path) -> str:
    """A short display name for one eval dataset: the last two parts of a path."""
    return dataset_labels([path])[str(path)]
