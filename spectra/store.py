"""The snapshot store: `runs/<id>/snapshots.zarr` (written while pretraining) and analysis stores.

Layout (Zarr v3, written through xarray, one group per parameter because shapes differ):

    snapshots.zarr/              attrs: config, model_config, versions, git_sha, grad_mode, sketch_rank
      meta/                      dims (step): tokens, lr, loss, grad_norm, wall_time  <- commit record
      params/<layer>.<comp>/     e.g. params/3.q, params/0.down, params/embed, params/lm_head
        weight  (step, out, in)  float32 on disk, original dtype in attrs["dtype"]
        grad    (step, out, in)  when grad_mode == "full"
        grad_u (step, out, rank), grad_s (step, rank), grad_v (step, in, rank)   when "sketch"

Crash safety: a snapshot's parameter arrays are appended first and its row in `meta/` last, so
`meta/` is the commit record. Readers only see the first len(meta.step) entries of every array;
a writer reopening a store cuts any longer (half-written) tails back, so a kill -9 leaves each
snapshot fully there or absent.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
import zarr

from spectra.errors import SpectraError
from spectra.models import iter_components

STORE_KIND = "spectra-snapshots"
ANALYSIS_KIND = "spectra-analysis"
FORMAT_VERSION = 1


def param_key(layer: int, component: str) -> str:
    return f"{layer}.{component}"


def read_json(path: str | Path) -> dict:
    """A JSON object file a run holds (rank maps, configs); anything else is one error line."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SpectraError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise SpectraError(f"{path} does not hold a JSON object")
    return obj


def _to_json(obj) -> str:
    return json.dumps(obj, default=str, sort_keys=True)


# --------------------------------------------------------------------------- writer
class SnapshotWriter:
    """Append weight/gradient snapshots to a store; safe to reopen after a crash or for `--resume`.

    `write()` copies tensors to host synchronously (so training may go on mutating them) and
    hands the Zarr writes to a background thread; the next `write()` or `close()` waits for it.
    """

    def __init__(self, path: str | Path, attrs: dict | None = None, *, grad_mode: str = "sketch",
                 sketch_rank: int = 32, embeddings: bool = False, background: bool = True):
        if grad_mode not in ("full", "sketch", "none"):
            raise SpectraError(f"grad mode must be full, sketch or none, not {grad_mode!r}")
        self.path = Path(path)
        self.grad_mode, self.sketch_rank, self.embeddings, self.background = grad_mode, sketch_rank, embeddings, background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        if (self.path / "zarr.json").is_file():
            root = _open_group(self.path, "r+")
            if root.attrs.get("kind") != STORE_KIND:
                raise SpectraError(f"{self.path} is not a spectra snapshot store")
            self.grad_mode = root.attrs.get("grad_mode", grad_mode)
            self.sketch_rank = int(root.attrs.get("sketch_rank", sketch_rank))
            self.steps = list(_committed_steps(self.path))
            self._cut_tails(len(self.steps))
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            root = zarr.open_group(self.path, mode="w")
            root.attrs.update({"kind": STORE_KIND, "format_version": FORMAT_VERSION, "grad_mode": grad_mode,
                               "sketch_rank": sketch_rank, **{k: _jsonable(v) for k, v in (attrs or {}).items()}})
            self.steps = []

    # -- public -------------------------------------------------------------------------------
    @property
    def last_step(self) -> int | None:
        return self.steps[-1] if self.steps else None

    def truncate_after(self, step: int) -> None:
        """Drop snapshots taken after `step` (used by `--resume`: they will be taken again)."""
        self.wait()
        keep = sum(1 for s in self.steps if s <= step)
        if keep < len(self.steps):
            self.steps = self.steps[:keep]
            self._cut_tails(keep, meta_too=True)

    def write(self, model: torch.nn.Module, *, step: int, tokens: int, lr: float, loss: float,
              grad_norm: float = float("nan")) -> None:
        """Snapshot every decoder linear weight (and gradient) of `model` at `step`."""
        self.wait()
        if self.steps and step <= self.steps[-1]:
            raise SpectraError(f"snapshot step {step} is not after the last stored step {self.steps[-1]} in {self.path}")
        params = self._collect(model)
        meta = dict(step=step, tokens=tokens, lr=lr, loss=loss, grad_norm=grad_norm, wall_time=time.time())
        self.steps.append(step)
        if self.background:
            self._thread = threading.Thread(target=self._write_guarded, args=(params, meta), daemon=False)
            self._thread.start()
        else:
            self._write(params, meta)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise SpectraError(f"snapshot write to {self.path} failed: {err}")

    close = wait

    # -- internals ------------------------------------------------------------------------------
    def _collect(self, model) -> dict[str, dict]:
        named = [(l, c, m.weight) for l, c, _, m in iter_components(model) if hasattr(m, "weight")]
        if self.embeddings:
            inner = getattr(model, "model", model)
            named.append((-1, "embed", inner.embed_tokens.weight))
            if getattr(model, "lm_head", None) is not None:
                named.append((-1, "lm_head", model.lm_head.weight))
        out = {}
        for layer, comp, p in named:
            key = comp if layer < 0 else param_key(layer, comp)
            rec = {"attrs": {"layer": layer, "component": comp, "dtype": str(p.dtype).replace("torch.", ""),
                             "shape": list(p.shape)},
                   "weight": p.detach().float().cpu().numpy().copy()}
            g = p.grad
            if self.grad_mode != "none" and g is not None:
                if not torch.isfinite(g).all():
                    raise SpectraError(f"non-finite gradient in {key} at this step; snapshot not written "
                                       "(earlier snapshots are intact)")
                if self.grad_mode == "full":
                    rec["grad"] = g.detach().float().cpu().numpy().copy()
                else:
                    r = min(self.sketch_rank, *g.shape)
                    u, s, vh = torch.linalg.svd(g.detach().float(), full_matrices=False)
                    rec["grad_u"] = u[:, :r].cpu().numpy()
                    rec["grad_s"] = s[:r].cpu().numpy()
                    rec["grad_v"] = vh[:r].T.contiguous().cpu().numpy()
            out[key] = rec
        return out

    def _write_guarded(self, params, meta):
        try:
            self._write(params, meta)
        except BaseException as e:  # noqa: BLE001 - surfaced by wait()
            self._error = e

    def _write(self, params: dict, meta: dict) -> None:
        step = meta["step"]
        first = len(self.steps) == 1
        for key, rec in params.items():
            dims = {"weight": ("step", "out", "in"), "grad": ("step", "out", "in"),
                    "grad_u": ("step", "out", "rank"), "grad_s": ("step", "rank"), "grad_v": ("step", "in", "rank")}
            ds = xr.Dataset({k: (dims[k], v[None]) for k, v in rec.items() if k != "attrs"}, coords={"step": [step]})
            ds.attrs.update(rec["attrs"])
            exists = (self.path / "params" / key / "zarr.json").is_file()
            ds.to_zarr(self.path, group=f"params/{key}", mode="a" if exists else "w",
                       append_dim="step" if exists else None, consolidated=False)
        m = xr.Dataset({k: ("step", [v]) for k, v in meta.items() if k != "step"}, coords={"step": [step]})
        exists = (self.path / "meta" / "zarr.json").is_file() and not first
        m.to_zarr(self.path, group="meta", mode="a" if exists else "w", append_dim="step" if exists else None,
                  consolidated=False)

    def _cut_tails(self, n: int, meta_too: bool = False) -> None:
        root = _open_group(self.path, "r+")
        groups = [root["params"][k] for k in root["params"].group_keys()] if "params" in root else []
        if meta_too and "meta" in root:
            groups.append(root["meta"])
        for g in groups:
            for name in list(g.array_keys()):
                a = g[name]
                dims = a.metadata.dimension_names or ()
                if dims and dims[0] == "step" and a.shape[0] > n:
                    a.resize((n, *a.shape[1:]))


def _jsonable(v):
    try:
        json.dumps(v)
        return v
    except TypeError:
        return json.loads(_to_json(v))


def _open_group(path: Path, mode: str):
    try:
        return zarr.open_group(path, mode=mode)
    except Exception as e:  # noqa: BLE001
        raise SpectraError(f"{path} is not a readable Zarr store ({type(e).__name__}: {e})") from None


def _committed_steps(path: Path) -> np.ndarray:
    if not (path / "meta" / "zarr.json").is_file():
        return np.array([], dtype=np.int64)
    return xr.open_zarr(path, group="meta", consolidated=False)["step"].values


# --------------------------------------------------------------------------- reader
@dataclass
class Run:
    """A snapshot store opened for analysis (only committed snapshots are visible)."""

    path: Path
    attrs: dict
    meta: xr.Dataset

    @property
    def steps(self) -> np.ndarray:
        return self.meta["step"].values

    @property
    def grad_mode(self) -> str:
        return self.attrs.get("grad_mode", "none")

    def keys(self) -> list[tuple[int, str]]:
        """(layer, component) of every stored decoder linear, in layer then q,k,v,o,gate,up,down order."""
        from spectra.models import COMPONENTS

        order = list(COMPONENTS)
        root = _open_group(self.path, "r")
        out = []
        for k in root["params"].group_keys() if "params" in root else []:
            layer, _, comp = k.partition(".")
            if layer.lstrip("-").isdigit() and comp in COMPONENTS:
                out.append((int(layer), comp))
        return sorted(out, key=lambda lc: (lc[0], order.index(lc[1])))

    @property
    def layers(self) -> list[int]:
        return sorted({l for l, _ in self.keys()})

    def param(self, layer: int | str, component: str | None = None) -> xr.Dataset:
        """The lazily loaded dataset of one parameter: weight, and grad or grad_u/grad_s/grad_v."""
        key = param_key(layer, component) if component is not None else str(layer)
        try:
            ds = xr.open_zarr(self.path, group=f"params/{key}", consolidated=False)
        except Exception:  # noqa: BLE001
            raise SpectraError(f"{self.path} has no parameter {key!r}") from None
        return ds.isel(step=slice(0, len(self.steps)))

    def weight(self, layer: int, component: str) -> xr.DataArray:
        return self.param(layer, component)["weight"]

    def grad_basis(self, layer: int, component: str, rank: int, side: str = "left") -> xr.DataArray:
        """Orthonormal top-`rank` gradient singular vectors per step, (step, out|in, rank), from the
        stored sketch or from an SVD of the stored full gradient."""
        ds = self.param(layer, component)
        if "grad_u" in ds:
            v = ds["grad_u" if side == "left" else "grad_v"]
            if rank > v.sizes["rank"]:
                raise SpectraError(f"rank {rank} exceeds the stored sketch rank {v.sizes['rank']}")
            return v.isel(rank=slice(0, rank))
        if "grad" not in ds:
            raise SpectraError(f"{self.path} stores no gradients (grad_mode={self.grad_mode})")
        g = torch.from_numpy(ds["grad"].values)
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        basis = (u[..., :rank] if side == "left" else vh[..., :rank, :].transpose(-1, -2)).numpy()
        return xr.DataArray(basis, dims=("step", "out" if side == "left" else "in", "rank"),
                            coords={"step": ds["step"].values})


def open_run(path: str | Path) -> Run:
    """Open `runs/<id>` or `runs/<id>/snapshots.zarr` for reading (one clear error if it is not one)."""
    p = Path(path)
    if (p / "snapshots.zarr").is_dir():
        p = p / "snapshots.zarr"
    if not p.exists():
        raise SpectraError(f"no snapshot store at {path}")
    root = _open_group(p, "r")
    attrs = dict(root.attrs)
    if attrs.get("kind") != STORE_KIND:
        raise SpectraError(f"{p} is not a spectra snapshot store (kind={attrs.get('kind')!r})")
    try:
        meta = xr.open_zarr(p, group="meta", consolidated=False).load()
    except Exception:  # noqa: BLE001
        raise SpectraError(f"{p} has no committed snapshots yet (meta/ missing or corrupt)") from None
    return Run(path=p, attrs=attrs, meta=meta)


# --------------------------------------------------------------------------- analysis stores
def write_analysis(path: str | Path, name: str, ds: xr.Dataset, attrs: dict | None = None) -> Path:
    """Write one analysis (e.g. "spectrum", "grad_subspace", "hessian_gap") as group `name` of
    the Zarr store at `path` (created if missing), replacing an older result of the same name."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(p, mode="a")
    if root.attrs.get("kind") not in (None, ANALYSIS_KIND):
        raise SpectraError(f"{p} is not a spectra analysis store")
    root.attrs["kind"] = ANALYSIS_KIND
    ds = ds.copy()
    # fixed-width numpy strings ('<U4') have no Zarr v3 spec (zarr warns on every write); the
    # variable-length UTF-8 type does, and reads back as the same strings
    ds = ds.assign({k: v.astype(object) for k, v in ds.data_vars.items() if v.dtype.kind == "U"})
    ds = ds.assign_coords({k: v.astype(object) for k, v in ds.coords.items() if v.dtype.kind == "U"})
    ds.attrs.update({k: _jsonable(v) for k, v in (attrs or {}).items()})
    ds.attrs = {k: (_to_json(v) if isinstance(v, dict) else v) for k, v in ds.attrs.items()}
    ds.to_zarr(p, group=name, mode="w", consolidated=False)
    return p


def read_analysis(path: str | Path, name: str) -> xr.Dataset:
    p = Path(path)
    if not p.exists():
        raise SpectraError(f"no analysis store at {p}")
    try:
        return xr.open_zarr(p, group=name, consolidated=False).load()
    except Exception:  # noqa: BLE001
        raise SpectraError(f"{p} has no analysis {name!r} (run `spectra {name.replace('_', '-')}` first)") from None
