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
"""

from __future__ import annotations

import itertools
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
import zarr
from torch.distributed.tensor import DTensor

from spectra.distributed import full
from spectra.errors import SpectraError
from spectra.io.atomic import _jsonable, atomic_write_json
from spectra.io.zarr_meta import _CM_EMPTY, COMMIT_KEY, _group_md, _members, _open_group, _root_metadata, _steps_of
from spectra.linalg.svd import randomized_svd, sketch_error
from spectra.models.parts import COMPONENTS, iter_components

STORE_KIND = "spectra-snapshots"
FORMAT_VERSION = 2  # 2: commit record in the root metadata; 1: meta/ written last (read-only support)


def param_key(layer: int, component: str) -> str:
    return f"{layer}.{component}"


def component_records(model: torch.nn.Module, embeddings: bool = False, grads: bool = True, host: bool = True):
    """(key, record) for every decoder linear (and with `embeddings` embed_tokens, lm_head) of `model`, in model
    order, each weight and gradient gathered on its own (`DTensor.full_tensor`) when the model is FSDP2-sharded:
    at most one component is ever whole on a rank. Every rank of a sharded model must run this generator to the
    end, in step (the gathers are collectives); ranks other than the writing one pass `host=False` (nothing is
    copied to host memory, each gathered tensor is dropped at once). A non-finite gradient raises on every
    rank alike."""
    named = [(l, c, m.weight) for l, c, _, m in iter_components(model) if hasattr(m, "weight")]
    if embeddings:
        inner = getattr(model, "model", model)
        named.append((-1, "embed", inner.embed_tokens.weight))
        if getattr(model, "lm_head", None) is not None:
            named.append((-1, "lm_head", model.lm_head.weight))
    for layer, comp, p in named:
        key = comp if layer < 0 else param_key(layer, comp)
        w = full(p.detach())
        rec = {"attrs": {"layer": layer, "component": comp, "dtype": str(p.dtype).replace("torch.", ""),
                         "shape": list(p.shape)}}
        if host:
            rec["weight"] = w.float().cpu().numpy().copy()
        del w
        g = p.grad
        if grads and g is not None:
            g = full(g.detach())
            if not torch.isfinite(g).all():
                raise SpectraError(f"non-finite gradient in {key} at this step; snapshot not written "
                                   "(earlier snapshots are intact)")
            if host:  # host copy now; the sketch's SVD runs on the writer thread, off the training step
                rec["grad"] = g.float().cpu().clone()
        yield key, rec


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
        # host copies of everything at once (training may go on), or for an FSDP2-sharded model written without a
        # background thread, lazily: one component gathered and written at a time, so no rank ever holds every
        # weight, rank 0's host included
        lazy = not self.background and any(isinstance(p, DTensor) for p in model.parameters())
        params = component_records(model, self.embeddings, self.grad_mode != "none") if lazy else self._collect(model)
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
        return dict(component_records(model, self.embeddings, self.grad_mode != "none"))

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

    def _write(self, params, meta: dict) -> None:
        if self._dirty:
            self._repair()
            self._dirty = False
        step, append = meta["step"], bool(self.committed)
        n = len(self.committed) + 1
        try:
            for key, rec in params.items() if isinstance(params, dict) else params:
                self._append(key, rec, step, append, n)
        finally:  # a failed lazy write still takes part in every remaining gather (the other ranks wait there)
            for _ in () if isinstance(params, dict) else params:
                pass
        m = xr.Dataset({k: ("step", [v]) for k, v in meta.items() if k != "step"}, coords={"step": [step]})
        m.to_zarr(self.path, group="meta", mode="a" if append else "w", append_dim="step" if append else None,
                  consolidated=False)
        self._noted("meta", m, n)
        self._publish(self.committed + [step])  # the one atomic act that makes this snapshot exist
        self.committed = self.committed + [step]

    _DIMS = {"weight": ("step", "out", "in"), "grad": ("step", "out", "in"), "grad_u": ("step", "out", "rank"),
             "grad_s": ("step", "rank"), "grad_v": ("step", "in", "rank")}

    def _append(self, key: str, rec: dict, step: int, append: bool, n: int) -> None:
        if "grad" in rec:
            self._sketch(rec)
        ds = xr.Dataset({k: (self._DIMS[k], v[None]) for k, v in rec.items() if k != "attrs"},
                        coords={"step": [step]})
        ds.attrs.update(rec["attrs"])
        ds.to_zarr(self.path, group=f"params/{key}", mode="a" if append else "w",
                   append_dim="step" if append else None, consolidated=False)
        self._noted(f"params/{key}", ds, n)

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
    # the consolidated metadata still lists a group whose folder was deleted, and xarray would then read
    # every chunk as its fill value (all-zero steps, all-NaN weights): the folder itself must be there
    if not (path / group / "zarr.json").is_file():
        raise SpectraError(f"{path}/{group} is missing; the store is damaged (restore the folder from a copy "
                           "of the run)")
    try:
        ds = xr.open_zarr(path, group=group, consolidated=consolidated)
    except Exception:  # noqa: BLE001
        raise SpectraError(f"{path} has no readable group {group!r}") from None
    if ds.sizes.get("step", 0) < n:
        raise SpectraError(f"{path}/{group} holds fewer snapshots than committed; the store is damaged")
    ds = ds.isel(step=slice(0, n))
    ds.encoding["source"] = str(path / group)  # read_values names the chunk in its error
    return ds


def read_values(da: xr.DataArray, array: Path, what: str = "") -> np.ndarray:
    """The values of a lazily opened store array (its folder `array`; `what` says which part, e.g. " at step
    4"); a truncated or corrupt chunk (a Zstd error, a short file) is one line naming the chunk file."""
    try:
        return da.values
    except Exception as e:  # noqa: BLE001 - zarr/numcodecs raise RuntimeError, ValueError, OSError, ...
        why = " ".join(str(e).split())[:160]
        raise SpectraError(f"cannot read {_bad_chunk(array)}{what} ({type(e).__name__}: {why}); the file is "
                           "truncated or corrupt: restore the store from a copy of the run") from None


def _bad_chunk(array: Path) -> Path:
    """The first chunk file of `array` that does not decode (the array folder when each one does)."""
    try:
        a = zarr.open_array(array, mode="r")
        for idx in itertools.product(*(range(n) for n in a.cdata_shape)):
            try:
                a.blocks[idx]
            except Exception:  # noqa: BLE001 - this is the one
                return array.joinpath("c", *map(str, idx))
    except Exception:  # noqa: BLE001 - the array's own metadata is unreadable: name the array
        pass
    return array


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
    if not (p / "meta" / "zarr.json").is_file():
        raise SpectraError(f"{p}/meta is missing, so the snapshots' steps are unknown; the store is damaged "
                           "(restore meta/ from a copy of the run)")
    try:
        meta = _read_committed(p, "meta", len(steps), consolidated).load()
    except SpectraError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SpectraError(f"{p} has unreadable snapshot metadata ({type(e).__name__}); a store from an older "
                           "spectra is repaired by `spectra pretrain --resume` on the run, a damaged one by "
                           "restoring meta/ from a copy") from None
    if [int(s) for s in meta["step"].values] != steps:  # chunk files gone: zarr reads fill values (step 0)
        raise SpectraError(f"{p}/meta/step holds steps {[int(s) for s in meta['step'].values][:6]}, not the "
                           f"committed {steps[:6]}; the store is damaged (restore meta/ from a copy of the run)")
    return Run(path=p, attrs=attrs, meta=meta, consolidated=consolidated)
