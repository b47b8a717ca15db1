"""The hub's C4 `en` stream (`allenai/c4`, what GaLore trains on): the data every command uses when no
local text is given.

Offline is one fast line: with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or when the hub's endpoint
does not answer a TCP connect within a few seconds, the hub is never asked; otherwise `datasets`
retries for ~25-40 s (printing each retry) before failing.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

import datasets
from huggingface_hub import constants as hub_constants

from spectra.errors import SpectraError

HUB_C4 = ("allenai/c4", "en")
CONNECT_TIMEOUT_S = 5.0
_TRUE = ("1", "true", "yes", "on")
_PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable() -> str | None:
    """Why the hub cannot serve data now (offline flag set, endpoint not answering), or None."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    if getattr(hub_constants, "HF_HUB_OFFLINE", False):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in _PROXIES):
        return None  # only the proxy knows the way out: let the request try
    url = urlparse(os.environ.get("HF_ENDPOINT") or hub_constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return None
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        return f"{host} is unreachable: {e.strerror or type(e).__name__}"
    return None


def load_hub_c4(split: str = "train", flag: str = "--data"):
    """The real C4 `en` stream from the hub (`split` train or validation); one fast line naming `flag`
    when the hub cannot be reached."""
    why = hub_unreachable()
    if why is None:
        try:
            return datasets.load_dataset(*HUB_C4, split=split, streaming=True)
        except Exception as e:  # noqa: BLE001 - unreachable, gated, renamed: one line
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    raise SpectraError(f"no {flag} given and the hub dataset {HUB_C4[0]} ({split}) is not available ({why}); "
                       f"pass {flag} PATH (json/jsonl(.gz)/txt/parquet files, globs or folders)")
