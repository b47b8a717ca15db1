"""The snapshot store: `runs/<id>/snapshots.zarr` (written while pretraining) and analysis stores.

Layout (Zarr v3, written through xarray, one group per parameter because shapes differ):

    snapshots.zarr/              attrs: config, model_config, versions, git_sha, grad_mode, sketch_rank,
                                        committed_steps  <- THE COMMIT RECORD (see below)
      meta/                      dims (step): tokens, lr, loss, grad_norm, wall_time
      params/<layer>.<comp>/     e.g. params/3.q, params/0.down, params/embed, params/lm_head
        weight  (step, out, in)  float32 on disk, original dtype in attrs["dtype"]
        grad    (step, out, in)  when grad_mode == "full"
        grad_u (step, out, rank), grad_s (step, rank), grad_v (step, in, rank)   when "sketch"

Commit protocol (crash safety under kill -9, Ctrl-C, SIGTERM or an exception at any moment):

1. A snapshot's arrays (every params/<key>/* and meta/*) are appended first. Zarr writes each
   file through a temporary name and a rename, so a file is whole or absent, but a snapshot is
   many files: after a kill some arrays may be one step longer than others (a torn tail).
2. Then the snapshot is published by ONE atomic act: the root `zarr.json` is rewritten (temporary
   file, fsync, `os.replace`, fsync of the folder) with `committed_steps` in its attributes and
   Zarr's consolidated metadata of every member with the `step` length set to the committed count.
   Until that rename nothing of the new snapshot is visible; after it, all of it is.
3. Readers (`open_run`, and plain `xr.open_zarr(store, group=...)`, which uses consolidated
   metadata by default) therefore see exactly the committed steps, whatever lies beyond them.
4. A writer reopening the store cuts every array back to the committed length before appending.
   Resume truncation (`truncate_after`) publishes the shorter record first and shrinks the arrays
   after, so no committed byte is deleted before the new state is durable.

Analysis stores (`analysis.zarr`) hold one xarray group per analysis; a group (or a tree of them,
`write_analysis_tree`, e.g. the calibration) is written under a temporary name and swapped in by
renames, never deleted before its replacement is complete, and `merge=` updates only the given
coordinates of a stored group (a partial `hessian-gap` keeps the other layers' results).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
import zarr

from spectra.errors import SpectraError

STORE_KIND = "spectra-snapshots"
ANALYSIS_KIND = "spectra-analysis"
FORMAT_VERSION = 2  # 2: commit record in the root metadata; 1: meta/ written last (read-only support)
COMMIT_KEY = "committed_steps"
_CM_EMPTY = {"kind": "inline", "must_understand": False, "metadata": {}}


def param_key(layer: int, component: str) -> str:
    return f"{layer}.{component}"


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


def _open_group(path: Path, mode: str, consolidated: bool | None = False):
    try:
        return zarr.open_group(path, mode=mode, use_consolidated=consolidated)
    except Exception as e:  # noqa: BLE001
        raise SpectraError(f"{path} is not a readable Zarr store ({type(e).__name__}: {e})") from None


def _root_metadata(path: Path) -> dict:
    try:
        md = json.loads((path / "zarr.json").read_text())
        assert isinstance(md, dict) and md.get("node_type") == "group"
        return md
    except Exception as e:  # noqa: BLE001
        raise SpectraError(f"{path} is not a readable Zarr store ({type(e).__name__}: {e})") from None


def _members(path: Path, prefix: str = "") -> dict[str, dict]:
    """Live metadata of every group/array below `path` (flat keys), without entering chunk folders."""
    out = {}
    for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        md_file = child / "zarr.json"
        if not md_file.is_file():
            continue
        md = json.loads(md_file.read_text())
        key = f"{prefix}{child.name}"
        if md.get("node_type") == "group":
            md["consolidated_metadata"] = dict(_CM_EMPTY)  # as zarr.consolidate_metadata writes it
            out[key] = md
            out.update(_members(child, key + "/"))
        else:
            out[key] = md
    return out


def _steps_of(md: dict) -> list[int] | None:
    steps = md.get("attributes", {}).get(COMMIT_KEY)
    return None if steps is None else [int(s) for s in steps]


# --------------------------------------------------------------------------- gradient sketch
def randomized_svd(g: torch.Tensor, r: int, oversample: int, power_iters: int, seed: int = 0):
    """Top-r (u [m, r], s [r], v [n, r]) of `g` by a randomized range finder with power iterations."""
    m, n = g.shape
    k = min(r + oversample, m, n)
    gen = torch.Generator(device=g.device).manual_seed(int(seed))
    q = torch.linalg.qr(g @ torch.randn(n, k, generator=gen, dtype=g.dtype, device=g.device)).Q
    for _ in range(power_iters):  # re-orthonormalise both ways: plain powers lose the small directions
        z = torch.linalg.qr(g.T @ q).Q
        q = torch.linalg.qr(g @ z).Q
    ub, s, vh = torch.linalg.svd(q.T @ g, full_matrices=False)
    return (q @ ub[:, :r]), s[:r], vh[:r].T


def sketch_error(g: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> dict:
    """How far a rank-r sketch is from the exact top-r SVD of `g` (one exact SVD; float64 sums).

    sketch_sin_theta_u/v: sine of the largest principal angle between the sketch's and the exact
    top-r singular subspaces; sketch_tail_excess: (||g - u s v^T||_F^2 - optimal tail energy) /
    ||g||_F^2, i.e. the energy the sketch misses beyond what any rank-r approximation must;
    sketch_sv_rel_err: max_i |s_i - sigma_i| / sigma_1."""
    r = s.shape[0]
    ue, se, vhe = torch.linalg.svd(g, full_matrices=False)
    ve = vhe.T

    def sin_theta(a, b):
        c = torch.linalg.svdvals(a[:, :r].T @ b).min().clamp(max=1.0)
        return float(torch.sqrt(1 - c.double() ** 2))

    total = float((g.double() ** 2).sum())
    resid = float(((g - (u * s) @ v.T).double() ** 2).sum())
    tail = float((se[r:].double() ** 2).sum())
    return {"sketch_sin_theta_u": sin_theta(ue, u), "sketch_sin_theta_v": sin_theta(ve, v),
            "sketch_tail_excess": max(resid - tail, 0.0) / max(total, 1e-300),
            "sketch_sv_rel_err": float((s - se[:r]).abs().max() / se[0].clamp(min=1e-30))}


# --------------------------------------------------------------------------- writer
class SnapshotWriter:
    """Append weight/gradient snapshots to a store; safe to reopen after a crash or for `--resume`.

    `write()` copies tensors to host synchronously (so training may go on mutating them) and
    hands the gradient sketch and the Zarr writes to a background thread; the next `write()`,
    `wait()` or `close()` waits for it. `committed` lists the published steps, `steps` also the
    one in flight.
    """

    def __init__(self, path: str | Path, attrs: dict | None = None, *, grad_mode: str = "sketch",
                 sketch_rank: int = 32, embeddings: bool = False, background: bool = True):
        if grad_mode not in ("full", "sketch", "none"):
            raise SpectraError(f"grad mode must be full, sketch or none, not {grad_mode!r}")
        if sketch_rank < 1:
            raise SpectraError(f"sketch rank must be >= 1, not {sketch_rank}")
        self.path = Path(path)
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._dirty = False  # a failed write may have left torn tails: cut them before the next one
        self._cache: dict[str, dict] | None = None  # member metadata for _publish (see _noted)
        if (self.path / "zarr.json").is_file():
            a = _root_metadata(self.path).get("attributes", {})
            if a.get("kind") != STORE_KIND:
                raise SpectraError(f"{self.path} is not a spectra snapshot store")
            # a reopened store keeps what it was created with (a resume may not switch modes midway)
            self.grad_mode = a.get("grad_mode", grad_mode)
            self.sketch_rank = int(a.get("sketch_rank", sketch_rank))
            self.embeddings = bool(a.get("embeddings", embeddings))
            self.committed = _committed(self.path)
            self._repair()
        else:
            self.grad_mode, self.sketch_rank, self.embeddings = grad_mode, sketch_rank, embeddings
            self.path.mkdir(parents=True, exist_ok=True)
            base = {"kind": STORE_KIND, "format_version": FORMAT_VERSION, "grad_mode": grad_mode,
                    "sketch_rank": sketch_rank, "embeddings": embeddings, COMMIT_KEY: []}
            md = {"zarr_format": 3, "node_type": "group", "consolidated_metadata": dict(_CM_EMPTY),
                  "attributes": {**{k: _jsonable(v) for k, v in (attrs or {}).items()}, **base}}
            atomic_write_json(self.path / "zarr.json", md)  # created whole, never half-labelled
            self.committed = []
        self.steps = list(self.committed)

    # -- public -------------------------------------------------------------------------------
    def truncate_after(self, step: int) -> None:
        """Drop snapshots taken after `step` (used by `--resume`: they will be taken again).
        The shorter commit record is published before any array shrinks."""
        self.wait()
        keep = [s for s in self.committed if s <= step]
        if len(keep) < len(self.committed):
            self._publish(keep)
            self.committed = keep
            self._repair()
        self.steps = list(self.committed)

    def write(self, model: torch.nn.Module, *, step: int, tokens: int, lr: float, loss: float,
              grad_norm: float = float("nan")) -> None:
        """Snapshot every decoder linear weight (and gradient) of `model` at `step`."""
        self.wait()
        if self.steps and step <= self.steps[-1]:
            raise SpectraError(f"snapshot step {step} is not after the last stored step {self.steps[-1]} in "
                               f"{self.path}")
        params = self._collect(model)
        meta = dict(step=step, tokens=tokens, lr=lr, loss=loss, grad_norm=grad_norm, wall_time=time.time())
        self.steps.append(step)
        if self.background:
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._write_guarded, args=(params, meta, self._done),
                                            daemon=False, name="spectra-snapshot")
            self._thread.start()
        else:
            self._write_guarded(params, meta)
            self._raise_pending()

    def wait(self) -> None:
        """Block until the snapshot in flight is committed (or raise why it was not)."""
        if self._thread is not None:
            # Wait on our own event, not on join() alone: in Python 3.11 a Ctrl-C that interrupts
            # Thread.join() marks the still-running thread as stopped (the bpo-45274 cleanup releases
            # its tstate lock), so the next join() -- ours in the error path, or the interpreter's at
            # exit -- returns at once and the process can end mid-snapshot. An interrupted
            # Event.wait() leaves nothing behind, and the next call waits again.
            self._done.wait()
            self._thread.join()
            self._thread = None
        self._raise_pending()

    close = wait

    # -- internals ------------------------------------------------------------------------------
    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            self.steps = list(self.committed)
            raise SpectraError(f"snapshot write to {self.path} failed: {err}")

    def _collect(self, model) -> dict[str, dict]:
        from spectra.models.parts import iter_components

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
                # host copy now; the sketch's SVD runs on the writer thread, off the training step
                rec["grad"] = g.detach().float().cpu().clone()
            out[key] = rec
        return out

    # The sketch is a randomized SVD (Halko, Martinsson & Tropp 2011, alg. 4.4): rank r + SKETCH_OVERSAMPLE
    # Gaussian probes, SKETCH_POWER_ITERS re-orthonormalised power iterations. Gradient spectra of these
    # layers decay slowly past the top few directions, so two power iterations are what brings the tail
    # energy to within ~1e-3 of the optimal rank-r one (tests/test_store.py measures it); each costs one
    # pass of two (m x n x k) matmuls, against O(m n min(m, n)) for the exact SVD. The probes come from a
    # private generator seeded by the step, so the training RNG is never touched (bit-exact resume).
    sketch_method = "randomized"  # or "exact": the full SVD, truncated
    SKETCH_OVERSAMPLE = 10
    SKETCH_POWER_ITERS = 2
    SKETCH_CHECK_EVERY = 10  # the error against the exact SVD: first snapshot of a writer, then every 10th

    def _sketch(self, rec: dict) -> None:
        if self.grad_mode == "full":
            rec["grad"] = rec.pop("grad").numpy()
            return
        # one thread: these are small LAPACK calls that run 5-25x slower when they fight the training
        # step for the cores (QR of 688 x 42: 0.33 ms alone, 8 ms on 2 busy threads). The OpenMP/MKL
        # thread count is per OS thread, so the training thread keeps its own.
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._sketch_one(rec)
        finally:
            torch.set_num_threads(prev)

    def _sketch_one(self, rec: dict) -> None:
        g = rec.pop("grad")
        r = min(self.sketch_rank, *g.shape)
        k = min(r + self.SKETCH_OVERSAMPLE, *g.shape)
        step = self.steps[-1] if self.steps else 0  # the snapshot in flight (write() waits before appending)
        exact = self.sketch_method == "exact" or k == min(g.shape)  # probes span everything: nothing to save
        if exact:
            u, s, vh = torch.linalg.svd(g, full_matrices=False)
            u, s, v = u[:, :r], s[:r], vh[:r].T
        else:
            u, s, v = randomized_svd(g, r, k - r, self.SKETCH_POWER_ITERS, seed=step)
        rec["attrs"]["sketch_method"] = "exact" if exact else "randomized"
        if not exact:
            rec["attrs"].update(sketch_oversample=k - r, sketch_power_iters=self.SKETCH_POWER_ITERS)
            # zarr replaces a group's attrs on append: the last measurement is carried to every snapshot
            errs = self.__dict__.setdefault("_sketch_errors", {})
            key = (rec["attrs"]["layer"], rec["attrs"]["component"])
            count = self.__dict__.setdefault("_sketch_count", {})
            count[key] = count.get(key, -1) + 1
            if count[key] % self.SKETCH_CHECK_EVERY == 0:
                errs[key] = {"sketch_error_step": int(step), **sketch_error(g, u, s, v)}
            rec["attrs"].update(errs.get(key, {}))
        rec["grad_u"] = u.contiguous().numpy()
        rec["grad_s"] = s.contiguous().numpy()
        rec["grad_v"] = v.contiguous().numpy()

    def _write_guarded(self, params, meta, done: threading.Event | None = None):
        try:
            self._write(params, meta)
        except BaseException as e:  # noqa: BLE001 - surfaced by wait()
            self._dirty = True
            self._error = e
        finally:
            if done is not None:
                done.set()

    def _write(self, params: dict, meta: dict) -> None:
        if self._dirty:
            self._repair()
            self._dirty = False
        step, append = meta["step"], bool(self.committed)
        n = len(self.committed) + 1
        dims = {"weight": ("step", "out", "in"), "grad": ("step", "out", "in"),
                "grad_u": ("step", "out", "rank"), "grad_s": ("step", "rank"), "grad_v": ("step", "in", "rank")}
        for key, rec in params.items():
            if "grad" in rec:
                self._sketch(rec)
            ds = xr.Dataset({k: (dims[k], v[None]) for k, v in rec.items() if k != "attrs"}, coords={"step": [step]})
            ds.attrs.update(rec["attrs"])
            ds.to_zarr(self.path, group=f"params/{key}", mode="a" if append else "w",
                       append_dim="step" if append else None, consolidated=False)
            self._noted(f"params/{key}", ds, n)
        m = xr.Dataset({k: ("step", [v]) for k, v in meta.items() if k != "step"}, coords={"step": [step]})
        m.to_zarr(self.path, group="meta", mode="a" if append else "w", append_dim="step" if append else None,
                  consolidated=False)
        self._noted("meta", m, n)
        self._publish(self.committed + [step])  # the one atomic act that makes this snapshot exist
        self.committed = self.committed + [step]

    def _noted(self, group: str, ds: xr.Dataset, n: int) -> None:
        """Bring the cached metadata of `group` up to date after `ds` was appended to it (now n snapshots).

        Appending one step changes, in the group's files, only the arrays' step length (now n, which is
        what _publish writes for them anyway) and the group's attributes (replaced by ds.attrs): so only
        the group's own zarr.json is reread, not every array's. A group or variable the cache does not
        know yet is read whole. Groups not written this time keep their cached (true) lengths, so
        _publish still refuses to commit a step some array does not hold. The cache is dropped whenever
        arrays are cut (_repair) and rebuilt by one full scan at the next publish."""
        if self._cache is None:
            return  # the next publish scans everything
        names = {str(k) for k in ds.variables}  # the arrays xarray writes: data variables and the step coordinate
        mine = [k for k in self._cache if k.startswith(f"{group}/")]
        if group not in self._cache or {k.rpartition("/")[2] for k in mine} != names:
            for k in [*mine, group]:
                self._cache.pop(k, None)
            self._cache.update({group: _group_md(self.path / group), **_members(self.path / group, f"{group}/")})
            return
        self._cache[group] = _group_md(self.path / group)
        for k in mine:
            a = self._cache[k]
            if (a.get("dimension_names") or [None])[0] == "step":
                self._cache[k] = {**a, "shape": [n, *a["shape"][1:]]}

    def _publish(self, steps: list[int]) -> None:
        """Rewrite the root metadata (commit record + consolidated metadata at len(steps)) atomically."""
        md = _root_metadata(self.path)
        n = len(steps)
        if n and self._cache is None:
            self._cache = _members(self.path)
        members = dict(self._cache) if n else {}
        for key, m in members.items():
            dims = m.get("dimension_names") or [None]
            if m.get("node_type") == "array" and dims[0] == "step":
                if m["shape"][0] < n:
                    raise SpectraError(f"{self.path}/{key} holds {m['shape'][0]} snapshots, fewer than the {n} to "
                                       "commit")
                members[key] = {**m, "shape": [n, *m["shape"][1:]]}
        md["attributes"][COMMIT_KEY] = [int(s) for s in steps]
        md["attributes"]["format_version"] = FORMAT_VERSION
        md["consolidated_metadata"] = {**_CM_EMPTY, "metadata": members}
        atomic_write_json(self.path / "zarr.json", md)

    def _repair(self) -> None:
        """Cut every array back to the committed length (only uncommitted data is removed)."""
        self._cache = None  # lengths change here: the next publish reads them from disk
        n = len(self.committed)
        if n == 0:
            self._publish([])
            for sub in ("params", "meta"):
                shutil.rmtree(self.path / sub, ignore_errors=True)
            return
        committed_keys = set(_root_metadata(self.path).get("consolidated_metadata", {}).get("metadata", {}))
        root = _open_group(self.path, "r+")
        groups = [("meta", root["meta"])] if "meta" in root else []
        if "params" in root:
            for k in list(root["params"].group_keys()):
                if committed_keys and f"params/{k}" not in committed_keys:  # born in a torn first write
                    shutil.rmtree(self.path / "params" / k, ignore_errors=True)
                else:
                    groups.append((f"params/{k}", root["params"][k]))
        for name, g in groups:
            for a_name in list(g.array_keys()):
                a = g[a_name]
                dims = a.metadata.dimension_names or ()
                if dims and dims[0] == "step":
                    if a.shape[0] < n:
                        raise SpectraError(f"{self.path}/{name}/{a_name} lost committed snapshots "
                                           f"({a.shape[0]} of {n}); the store is damaged")
                    if a.shape[0] > n:
                        a.resize((n, *a.shape[1:]))
        if not committed_keys:  # a format-1 store: publish once so readers get the record
            self._publish(self.committed)


def _committed(path: Path) -> list[int]:
    """The committed steps of a store (format 2: the record; format 1: the shortest meta/ array)."""
    md = _root_metadata(path)
    steps = _steps_of(md)
    if steps is not None:
        return steps
    if not (path / "meta" / "zarr.json").is_file():
        return []
    g = _open_group(path / "meta", "r")
    n = min(g[k].shape[0] for k in g.array_keys())
    return [int(s) for s in g["step"][:n]]


# --------------------------------------------------------------------------- reader
@dataclass
class Run:
    """A snapshot store opened for analysis (only committed snapshots are visible)."""

    path: Path
    attrs: dict
    meta: xr.Dataset
    consolidated: bool = True

    @property
    def steps(self) -> np.ndarray:
        return self.meta["step"].values

    @property
    def grad_mode(self) -> str:
        return self.attrs.get("grad_mode", "none")

    def keys(self) -> list[tuple[int, str]]:
        """(layer, component) of every stored decoder linear, in layer then q,k,v,o,gate,up,down order."""
        from spectra.models.parts import COMPONENTS

        order = list(COMPONENTS)
        if self.consolidated:
            names = [k.split("/")[1] for k in _root_metadata(self.path)["consolidated_metadata"]["metadata"]
                     if k.startswith("params/") and k.count("/") == 1]
        else:
            root = _open_group(self.path, "r")
            names = list(root["params"].group_keys()) if "params" in root else []
        out = []
        for k in names:
            layer, _, comp = k.partition(".")
            if layer.lstrip("-").isdigit() and comp in COMPONENTS:
                out.append((int(layer), comp))
        return sorted(out, key=lambda lc: (lc[0], order.index(lc[1])))

    def param(self, layer: int | str, component: str | None = None) -> xr.Dataset:
        """The lazily loaded dataset of one parameter: weight, and grad or grad_u/grad_s/grad_v."""
        key = param_key(layer, component) if component is not None else str(layer)
        return _read_committed(self.path, f"params/{key}", len(self.steps), self.consolidated)

    def weight(self, layer: int, component: str) -> xr.DataArray:
        return self.param(layer, component)["weight"]


def _read_committed(path: Path, group: str, n: int, consolidated: bool) -> xr.Dataset:
    try:
        ds = xr.open_zarr(path, group=group, consolidated=consolidated)
    except Exception:  # noqa: BLE001
        raise SpectraError(f"{path} has no readable group {group!r}") from None
    if ds.sizes.get("step", 0) < n:
        raise SpectraError(f"{path}/{group} holds fewer snapshots than committed; the store is damaged")
    return ds.isel(step=slice(0, n))


def open_run(path: str | Path) -> Run:
    """Open `runs/<id>` or `runs/<id>/snapshots.zarr` for reading (one clear error if it is not one)."""
    p = Path(path)
    if (p / "snapshots.zarr").is_dir():
        p = p / "snapshots.zarr"
    if not p.exists():
        raise SpectraError(f"no snapshot store at {path}")
    md = _root_metadata(p)
    attrs = dict(md.get("attributes", {}))
    if attrs.get("kind") != STORE_KIND:
        raise SpectraError(f"{p} is not a spectra snapshot store (kind={attrs.get('kind')!r})")
    consolidated = _steps_of(md) is not None
    steps = _committed(p)
    if not steps:
        raise SpectraError(f"{p} has no committed snapshots yet")
    try:
        meta = _read_committed(p, "meta", len(steps), consolidated).load()
    except Exception as e:  # noqa: BLE001
        raise SpectraError(f"{p} has unreadable snapshot metadata ({type(e).__name__}); "
                           "`spectra pretrain --resume` on the run repairs a store from an older spectra") from None
    return Run(path=p, attrs=attrs, meta=meta, consolidated=consolidated)


# --------------------------------------------------------------------------- analysis stores
def write_analysis(path: str | Path, name: str, ds: xr.Dataset, attrs: dict | None = None,
                   merge: tuple[str, ...] = ()) -> Path:
    """Write one analysis (e.g. "spectrum", "grad_subspace", "hessian_gap") as group `name` of
    the Zarr store at `path` (created if missing).

    Without `merge`, an older result of the same name is replaced. With `merge=("layer", ...)`,
    the new values replace the old ones only at their coordinates along those dimensions and every
    other stored entry is kept (all other coordinates must agree). The group is written under a
    temporary name and swapped in, so a kill leaves the old result or the new one.
    """
    p = _analysis_root(path)
    return _swap_in(p, name, {"": _prepared(p, name, ds, attrs, merge)})


def write_analysis_tree(path: str | Path, name: str, parts: dict[str, tuple[xr.Dataset, dict | None]]) -> Path:
    """Replace group `name` by a tree of datasets, `parts` = {"meta": (ds, attrs), "xtx/0.q": (ds, None), ...},
    all written under one temporary name and swapped in together: a kill leaves the whole old tree or
    the whole new one, never a mix, and the old one is not deleted before the new one is complete."""
    p = _analysis_root(path)
    return _swap_in(p, name, {sub: _prepared(p, f"{name}/{sub}", ds, attrs) for sub, (ds, attrs) in parts.items()})


def _analysis_root(path: str | Path) -> Path:
    """The analysis store at `path`, created if missing; anything else there is one error line."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SpectraError(f"{p} is a file, not an analysis store; choose another --out")
    if p.is_dir() and any(p.iterdir()) and not (p / "zarr.json").is_file():
        raise SpectraError(f"{p} is a non-empty folder that is not an analysis store; choose another --out")
    if not (p / "zarr.json").is_file():
        p.mkdir(parents=True, exist_ok=True)
        atomic_write_json(p / "zarr.json", {"zarr_format": 3, "node_type": "group",
                                             "attributes": {"kind": ANALYSIS_KIND}})
    elif _root_metadata(p).get("attributes", {}).get("kind") not in (None, ANALYSIS_KIND):
        raise SpectraError(f"{p} is not a spectra analysis store")
    return p


def _prepared(p: Path, name: str, ds: xr.Dataset, attrs: dict | None, merge: tuple[str, ...] = ()) -> xr.Dataset:
    """`ds` as it is stored: merged with the stored group (`merge`), variables described, strings and attrs
    in types Zarr v3 keeps."""
    ds = ds.copy()
    new_attrs = {k: _jsonable(v) for k, v in {**ds.attrs, **(attrs or {})}.items()}
    if merge and _group_dir(p, name).is_dir():
        old = read_analysis(p, name)
        for dim in set(ds.dims) | set(old.dims):
            if dim in merge or dim not in ds.coords or dim not in old.coords:
                continue
            if not np.array_equal(ds[dim].values, old[dim].values):
                raise SpectraError(f"the stored {name!r} in {p} has other {dim} values "
                                   f"({list(old[dim].values)[:6]}) than this one; write to another --out")
        ds = ds.combine_first(old)
        new_attrs = {**old.attrs, **new_attrs}
    from spectra.io.variables import attrs_for

    for k in ds.data_vars:  # units, long_name, description on every variable (spectra/io/variables.py)
        ds[k].attrs = {**attrs_for(str(k)), **ds[k].attrs}
    # fixed-width numpy strings ('<U4') have no Zarr v3 spec (zarr warns on every write); the
    # variable-length UTF-8 type does, and reads back as the same strings
    ds = ds.assign({k: v.astype(object) for k, v in ds.data_vars.items() if v.dtype.kind == "U"})
    ds = ds.assign_coords({k: v.astype(object) for k, v in ds.coords.items() if v.dtype.kind == "U"})
    ds.attrs = {k: (_to_json(v) if isinstance(v, dict) else v) for k, v in new_attrs.items()}
    return ds


def _swap_in(p: Path, name: str, parts: dict[str, xr.Dataset]) -> Path:
    """Write `parts` (sub-path -> dataset; "" is the group itself) under a temporary name beside group
    `name`, then swap it in: old -> .old-<name>, temporary -> name, drop .old-<name>. Between the two
    renames only .old-<name> exists, and read_analysis reads it."""
    final = _group_dir(p, name)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    old_dir = final.with_name(f".old-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub, ds in parts.items():
        group = tmp.relative_to(p).as_posix() + (f"/{sub}" if sub else "")
        ds.to_zarr(p, group=group, mode="w", consolidated=False)
    with _store_lock(p):  # two writers of one store: swaps and root-metadata updates take turns
        if final.is_dir():
            shutil.rmtree(old_dir, ignore_errors=True)
            os.replace(final, old_dir)
        os.replace(tmp, final)
        shutil.rmtree(old_dir, ignore_errors=True)
        _reconsolidate(p, name)
    return p


@contextmanager
def _store_lock(p: Path):
    import fcntl

    fd = os.open(p, os.O_RDONLY)  # the store folder itself: no lock file for Zarr to trip over
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock (a killed writer's lock goes with its process)


def _reconsolidate(p: Path, name: str) -> None:
    """Update the root's consolidated metadata for group `name` only (its entries dropped and reread, its
    parent groups added if missing); the other groups' entries are kept as they are. It is what plain
    `xr.open_zarr(store, group=...)` and `zarr.open_group` read, so it is replaced atomically; spectra's
    own reader (read_analysis) reads each group's own metadata and never depends on it. A store whose
    root has no consolidated metadata yet is scanned whole once."""
    md = _root_metadata(p)
    known = (md.get("consolidated_metadata") or {}).get("metadata")
    if known is None:
        members = _members(p)
    else:
        members = {k: v for k, v in known.items() if k != name and not k.startswith(f"{name}/")}
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in members:
                members[parent] = _group_md(p / parent)
        final = _group_dir(p, name)
        members[name] = _group_md(final)
        members.update(_members(final, f"{name}/"))
    md["consolidated_metadata"] = {**_CM_EMPTY, "metadata": dict(sorted(members.items()))}
    atomic_write_json(p / "zarr.json", md)


def _group_md(path: Path) -> dict:
    md = json.loads((path / "zarr.json").read_text())
    md["consolidated_metadata"] = dict(_CM_EMPTY)
    return md


def _group_dir(p: Path, name: str) -> Path:
    return p.joinpath(*name.split("/"))


def read_analysis(path: str | Path, name: str) -> xr.Dataset:
    p = Path(path)
    if not p.exists():
        raise SpectraError(f"no analysis store at {p}")
    try:
        return xr.open_zarr(p, group=_live_group(p, name), consolidated=False).load()
    except Exception:  # noqa: BLE001
        raise SpectraError(f"{p} has no analysis {name!r} (run `spectra {name.replace('_', '-')}` first)") from None


def _live_group(p: Path, name: str) -> str:
    """The path of group `name`, through `.old-<part>` where a writer was killed mid-swap of that part
    (`name` itself, or a tree holding it, e.g. the calibration group of calibration/meta)."""
    cur = p
    for part in name.split("/"):
        if not (cur / part / "zarr.json").is_file() and (cur / f".old-{part}" / "zarr.json").is_file():
            part = f".old-{part}"
        cur = cur / part
    return cur.relative_to(p).as_posix()
