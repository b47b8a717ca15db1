"""The Hessian through training: `hessian_gaps` at every checkpoint of a run (or of a checkpoint series), stored
step by step so that an interrupted sweep resumes, with the top-k eigenspace drift and the gradient alignment
over steps: what Theorems 2.1 and 2.2 of the WeLore paper predict, measured.

    groups = hessian_steps("runs/20m", batches, "runs/20m/analysis.zarr", k=8)   # every complete checkpoint
    drift = hessian_drift("runs/20m/analysis.zarr")                             # from the stored Ritz vectors

Groups of the analysis store, each with a leading `step` (the checkpoint's training step; a folder without one
is step 0, as `spectrum` labels it):

  hessian_gap        (step, layer, component, eig[, batch])  the table of `hessian_gaps`, one step per checkpoint
  hessian_density    (step, layer, component, node | grid)   its SLQ density (spectra.analysis.density)
  hessian_alignment  (step, layer, component[, batch])       `alignment` ‖U_kᵀ g‖ / ‖g‖ of each Hessian batch's
                     own gradient, `alignment_baseline` √(k/n), and `alignment_snapshot`: the same for the
                     gradient the run's snapshot store holds for that step (per batch, U_k of that batch; NaN
                     where the store holds no gradient at that step)
  hessian_vectors/s<step>/<layer>.<comp>   `vectors` (batch, eig, param) float32: the top k+1 Ritz vectors
  hessian_drift      (step, layer, component, batch)         `sin_theta`: sine of the largest principal angle
                     between the top-k Ritz subspaces of this and the previous stored step on the same batch
                     (the same tokens); `eig_change`: ‖λ_t − λ_{t−1}‖ / ‖λ_{t−1}‖ over the top k
                     (claims.eigenvalue_change); NaN at the first step. Recomputed over every stored step after
                     each sweep.

Cost: one model load and the Lanczos runs of one checkpoint per step. The token batches are made once by the
caller and used at every step (the same data: drift compares like with like). Each step is written as soon as
it is done, hessian_gap last, so a step is stored once its hessian_gap entry exists: a rerun skips the steps
stored with the same settings (SETTINGS, the token batches and the checkpoint folder) and computes the rest.
A store computed with other settings is refused (its steps would not compare), unless `replace`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import xarray as xr
from torch import nn

from spectra import distributed as dist_utils
from spectra.analysis.claims import eigenvalue_change
from spectra.analysis.hessian import check_batches, hessian_gaps, uncertified
from spectra.analysis.hessian_block import orthonormal_top
from spectra.analysis.subspace import principal_angles
from spectra.errors import SpectraError
from spectra.io.analysis_store import read_analysis, write_analysis, write_analysis_tree
from spectra.io.runs import checkpoint_candidates
from spectra.io.snapshots import Run, open_run, param_key, read_values
from spectra.io.sources import Source, resolve
from spectra.models.loading import load_causal_lm
from spectra.models.parts import resolve_device, select_components

# what a stored step must share with this sweep to be skipped (and the stored group to be added to)
SETTINGS = ("data", "k", "batches", "batch_size", "seq_len", "seed", "iterations", "tol", "gap_frac", "hvp")
ALIGNMENT = ("alignment", "alignment_baseline", "alignment_snapshot")
GIB = 1 << 30
KEYS = ("step", "layer", "component")  # every per-step write merges along these


@dataclass(frozen=True)
class Step:
    """One checkpoint of a sweep: its training step, model folder and the snapshot store of its run (if any)."""

    step: int
    folder: Path
    snapshots: Path | None = None


# --------------------------------------------------------------------------- inputs
def checkpoint_steps(source: Source, steps: Sequence[int] | None = None) -> list[Step]:
    """The checkpoints a sweep computes, ordered by step: a run (or its snapshots.zarr): every complete
    checkpoint, or those in `steps`; a series (`resolve` of several folders, a glob, hub revisions): its
    members; one checkpoint folder or hub model: one step, its training step, else `steps[0]`, else 0."""
    if source.kind == "series":
        if steps:
            raise SpectraError("give a series' steps to spectra.resolve(..., steps=), not to hessian_steps()")
        return [Step(m.step, m.model_dir, m.snapshots) for m in source.members]
    if source.kind in ("run", "snapshots") and source.run_dir is not None:
        root = source.run_dir / "checkpoints"
        found = dict(checkpoint_candidates(root, resumable=False))
        if not found:
            source.need_model("hessian-gap")  # one line: no checkpoint
            raise SpectraError(f"{root} holds no complete checkpoint")
        if steps:
            missing = sorted(set(int(s) for s in steps) - set(found))
            if missing:
                raise SpectraError(f"step(s) {missing} have no complete checkpoint in {root} (--steps); its "
                                   f"checkpoints are at steps {sorted(found)}")
            found = {s: found[s] for s in set(int(s) for s in steps)}
        return [Step(s, f, source.snapshots) for s, f in sorted(found.items())]
    folder = source.need_model("hessian-gap")
    if steps and len(steps) != 1:
        raise SpectraError(f"{source.text} is one checkpoint; --steps gives {len(steps)} steps")
    step = int(steps[0]) if steps else (source.step if source.step is not None else 0)
    return [Step(step, folder, source.snapshots)]


def batches_digest(batches: Sequence[torch.Tensor]) -> str:
    """Identifies the token batches (another --data, --tokenizer or --seq-len gives other ones)."""
    h = hashlib.sha256()
    for b in batches:
        h.update(str(tuple(b.shape)).encode())
        h.update(b.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def sweep_settings(*, data: str | None, k: int, batches: int, batch_size: int, seq_len: int, seed: int,
                   iterations: int, tol: float, gap_frac: float, hvp: str = "exact") -> dict:
    """What a stored step must share with this sweep (SETTINGS). hvp ("exact" | "fd"): fd eigenvalues differ
    from exact ones by the fd error, so a store holds one kind (a store from before the option is exact)."""
    return {"data": str(data) if data is not None else "token batches given in memory", "k": k, "batches": batches,
            "batch_size": batch_size, "seq_len": seq_len, "seed": seed, "iterations": iterations, "tol": tol,
            "gap_frac": gap_frac, "hvp": hvp}


def _attr_dict(value) -> dict:
    """A dict attr as stored (write_analysis stores dicts as JSON text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {}
    return dict(value) if isinstance(value, Mapping) else {}


def stored_gap(store: str | Path, settings: Mapping, replace: bool = False) -> xr.Dataset | None:
    """The stored `hessian_gap` group a sweep with `settings` adds to (None: none stored, or `replace`).

    Refused (one line, before any work) when it was computed with other settings: its steps would not compare
    with this sweep's (another k, other data, another seed ...), or by an older spectra (no step dimension)."""
    if replace:
        return None
    try:
        old = read_analysis(store, "hessian_gap")
    except SpectraError:
        return None  # nothing stored yet
    hint = "rerun with the stored settings, write to another --out, or pass --replace to recompute every step"
    if "step" not in old.dims:
        raise SpectraError(f"{store} holds a hessian_gap without a step dimension (from an older spectra); {hint}")
    for key in (*SETTINGS, "batches_sha256"):
        if key in settings and key in old.attrs and old.attrs[key] != settings[key]:
            flag = {"data": "--data", "batches_sha256": "--data/--tokenizer: other token batches"}.get(
                key, f"--{key.replace('_', '-')}")
            raise SpectraError(f"{store} holds hessian_gap results with {key} {old.attrs[key]} and this run has "
                               f"{settings[key]} ({flag}); {hint}")
    return old.sortby("step")


def _same_folder(a, b) -> bool:
    return Path(str(a)).resolve() == Path(str(b)).resolve()


def _done(old: xr.Dataset, step: int, keys: Sequence[tuple[int, str]]) -> bool:
    """Every (layer, component) of `keys` has a result at `step` in the stored group."""
    if step not in old.step.values:
        return False
    h = old["hvps"].sel(step=step)
    layers, comps = set(h.layer.values.tolist()), set(h.component.values.tolist())
    return all(l in layers and c in comps and np.isfinite(float(h.sel(layer=l, component=c))) for l, c in keys)


# --------------------------------------------------------------------------- snapshot gradients
def snapshot_gradients(run: Run, step: int, keys: Sequence[tuple[int, str]]) -> dict[tuple[int, str], torch.Tensor]:
    """The gradient the snapshot store holds at `step` for each of `keys` it stores, float32 (out, in): the
    training gradient at exactly that checkpoint's weights (pretrain's snapshot convention); a sketched store
    gives its rank-r part U·diag(s)·Vᵀ. Empty when the store has no gradients or no snapshot at that step."""
    steps = [int(s) for s in run.steps]
    if run.grad_mode not in ("full", "sketch") or step not in steps:
        return {}
    i, out = steps.index(step), {}
    have = set(run.keys())
    for key in keys:
        if key not in have:
            continue
        ds, where = run.param(*key), run.path / "params" / param_key(*key)
        at = f" (step {step})"
        if "grad" in ds:
            G = read_values(ds["grad"].isel(step=i), where / "grad", at)
        elif "grad_u" in ds:
            U, S, V = (read_values(ds[n].isel(step=i), where / n, at).astype(np.float64)
                       for n in ("grad_u", "grad_s", "grad_v"))
            G = (U * S) @ V.T
        else:
            continue
        G = torch.from_numpy(np.asarray(G, dtype=np.float32))
        if not torch.isfinite(G).all():
            raise SpectraError(f"{where} holds NaN or Inf gradients at step {step}; the store is damaged or the run "
                               "diverged")
        out[key] = G
    return out


# --------------------------------------------------------------------------- the sweep
def hessian_steps(source: Source | str | Path | Sequence[str | Path], batches: Sequence[torch.Tensor],
                  store: str | Path, *, steps: Sequence[int] | None = None, k: int = 8,
                  layers: Sequence[int | str] | None = None, components: Sequence[str] | None = None,
                  iterations: int = 400, tol: float = 1e-4, gap_frac: float = 0.1, block_size: int = 0,
                  density_hvps: int = 0, seed: int = 0, data: str | None = None, keep_vectors: bool | None = None,
                  max_vectors_gib: float = 1.0, replace: bool = False, device: str | torch.device = "auto",
                  loader: Callable[[Path], nn.Module] | None = None, progress: bool = True,
                  on_event: Callable[[str], None] | None = None,
                  on_step: Callable[[int, xr.Dataset], None] | None = None, hvp: str = "exact",
                  richardson: bool = False) -> dict[str, xr.Dataset]:
    """`hessian_gaps` at every checkpoint of `source`, each step written to the analysis store `store` as soon as
    it is done, then the drift over every stored step (module docstring for the groups).

    source: a run, a checkpoint series, one checkpoint folder or hub model (a `Source` or what `resolve`
    takes); steps: a run's checkpoint steps to compute (default: all). batches: the token batches used at every
    step; data: a label of where they came from (stored, and compared on a rerun). keep_vectors: keep the
    Ritz vectors (True), never (False), or when one step's take at most max_vectors_gib (None). replace: start
    the stored groups over when they hold other settings (default: refuse). loader: folder -> model (default:
    load_causal_lm on `device`, in the attention `hvp` runs: eager for exact, SDPA for fd). hvp, richardson:
    exact or finite-difference HVPs (`hessian_gaps`), stored in the groups' attrs (`hvp`; fd: `hvp_error` too).
    on_event(line): what a command prints (steps skipped, vectors not kept); on_step(step, gaps): each step's
    `hessian_gaps` Dataset once it is stored.
    Under torchrun every rank computes its share of the components (or, when `loader` returns models sharded by
    FSDP2, all ranks compute every component together) and rank 0 writes. Returns the stored
    groups hessian_gap, hessian_alignment and hessian_drift (on rank 0; {} on the others).
    """
    src = source if isinstance(source, Source) else resolve(source)
    chosen = checkpoint_steps(src, steps)
    if isinstance(max_vectors_gib, bool) or not max_vectors_gib >= 0:
        raise SpectraError(f"max_vectors_gib (--max-vectors-gib) must be >= 0, not {max_vectors_gib!r}")
    rank = dist.get_rank() if dist_utils.active() else 0
    say = (on_event or (lambda line: None)) if rank == 0 else (lambda line: None)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    attn = "sdpa" if hvp == "fd" else "eager"
    load = loader or (lambda folder: load_causal_lm(folder, device=dev, attn_implementation=attn))
    first = load(chosen[0].folder)  # its components say what every step computes (one architecture)
    ids = check_batches(first, batches)
    settings = sweep_settings(data=data, k=k, batches=len(ids), batch_size=int(ids[0].shape[0]),
                              seq_len=int(ids[0].shape[1]), seed=seed, iterations=iterations, tol=tol,
                              gap_frac=gap_frac, hvp=hvp)
    settings["batches_sha256"] = batches_digest(ids)
    settings["settings_id"] = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    old = stored_gap(store, settings, replace)
    weights = select_components(first, layers, components)
    if not weights:
        raise SpectraError("no component matches --layers/--components (a compressed component has no dense "
                           "weight to differentiate)")
    keys = sorted(weights)
    nbytes = 4 * len(ids) * (k + 1) * sum(w.numel() for w in weights.values())
    del weights  # they belong to the first model, which a skipped first step frees
    keep = keep_vectors if keep_vectors is not None else nbytes <= max_vectors_gib * GIB
    if keep_vectors is None and not keep:
        say(f"Ritz vectors not kept: one step's take {nbytes / GIB:.3g} GiB > --max-vectors-gib {max_vectors_gib:g} "
            "(pass --keep-vectors to keep them); without them there is no eigenspace drift "
            "(hessian_drift.sin_theta), only the eigenvalue change")
    checkpoints = _attr_dict(old.attrs.get("checkpoints")) if old is not None else {}
    todo, skipped = [], []
    for st in chosen:
        was = checkpoints.get(str(st.step))
        if was is not None and not _same_folder(was, st.folder):
            raise SpectraError(f"{store} holds hessian_gap step {st.step} computed from {was}, and this run has "
                               f"{st.folder} at that step; write to another --out, or pass --replace")
        if old is not None and _done(old, st.step, keys) and (
                not keep or _vectors_stored(store, st.step, keys, settings["settings_id"], st.folder)):
            skipped.append(st.step)
        else:
            todo.append(st)
    if skipped:
        say(f"step(s) {', '.join(map(str, skipped))} already stored in {store} with these settings: skipped")
    runs: dict[Path, Run | None] = {}
    block, fresh = block_size, replace
    first = first if todo and todo[0] is chosen[0] else None  # a skipped first step: its model is not needed
    for st in todo:
        model = first if st is chosen[0] else load(st.folder)
        first = None
        snaps = None
        if st.snapshots is not None and st.snapshots not in runs:
            try:
                runs[st.snapshots] = open_run(st.snapshots)
            except SpectraError as e:  # a damaged snapshot store costs the snapshot alignment, not the sweep
                say(f"alignment_snapshot not computed: {e}")
                runs[st.snapshots] = None
        if runs.get(st.snapshots) is not None:
            snaps = snapshot_gradients(runs[st.snapshots], st.step, keys)
        try:
            gaps, dens, *vecs = hessian_gaps(model, ids, k=k, layers=layers, components=components,
                                             iterations=iterations, tol=tol, gap_frac=gap_frac, block_size=block,
                                             density_hvps=density_hvps, seed=seed, density=True, vectors=keep,
                                             snapshot_grads=snaps, progress=progress, hvp=hvp,
                                             richardson=richardson)
        except SpectraError as e:  # the API knows the model, not the folder: name it
            raise SpectraError(f"{st.folder}: {e}") from None
        del model
        block = block if block > 0 else int(gaps.attrs["block_size"][0])  # timed once, on the first step
        if rank == 0:
            old = _write_step(store, st, gaps, dens, vecs[0] if vecs else None, settings, old, fresh,
                              runs.get(st.snapshots))
            fresh = False
            if on_step is not None:
                on_step(st.step, gaps)
    if rank != 0:
        return {}
    if todo or _read(store, "hessian_drift") is None:
        write_analysis(store, "hessian_drift", hessian_drift(store))
    return {name: read_analysis(store, name) for name in ("hessian_gap", "hessian_alignment", "hessian_drift")}


def _read(store: str | Path, name: str) -> xr.Dataset | None:
    try:
        return read_analysis(store, name)
    except SpectraError:
        return None


def _vectors_stored(store, step: int, keys, settings_id: str, folder: Path) -> bool:
    """Every component of `keys` has Ritz vectors stored at `step`, from these settings and this checkpoint."""
    attrs = _vector_attrs(store, step)
    return all(key in attrs and attrs[key].get("settings_id") == settings_id
               and _same_folder(attrs[key].get("checkpoint", ""), folder) for key in keys)


def _vector_attrs(store, step: int) -> dict[tuple[int, str], dict]:
    """The attrs of every stored Ritz-vector dataset of `step` (read without their data)."""
    root = Path(store) / "hessian_vectors" / f"s{step}"
    out = {}
    if root.is_dir():
        for sub in root.iterdir():
            layer, _, comp = sub.name.partition(".")
            if (sub / "zarr.json").is_file() and layer.isdigit():
                out[(int(layer), comp)] = dict(xr.open_zarr(store, group=f"hessian_vectors/s{step}/{sub.name}",
                                                            consolidated=False).attrs)
    return out


# --------------------------------------------------------------------------- writing one step
def _write_step(store, st: Step, gaps: xr.Dataset, dens: xr.Dataset, vecs: dict | None, settings: dict,
                old: xr.Dataset | None, fresh: bool, run: Run | None) -> xr.Dataset:
    """Write one step's groups (the vectors, the density, the alignment, then hessian_gap: a step is stored once
    its hessian_gap entry exists); returns the stored hessian_gap as it now is (for the next step's attrs).
    fresh: the first write of a `replace` sweep, which starts every group over."""
    step, merge = st.step, () if fresh else KEYS
    if vecs is not None:
        write_analysis_tree(store, f"hessian_vectors/s{step}", _vector_parts(store, st, vecs, settings, fresh))
    dens = dens.expand_dims(step=[step])
    dmerge, stored = merge, None if fresh else _read(store, "hessian_density")
    if stored is not None:
        if "step" not in stored.dims:
            dmerge = ()  # an older spectra's single-checkpoint density: started over
        elif stored.sizes["node"] > dens.sizes["node"]:  # the Krylov sizes differ from step to step: pad to one
            dens = dens.reindex(node=np.arange(stored.sizes["node"]))
    write_analysis(store, "hessian_density", dens, {"checkpoint": str(st.folder)},
                   merge=dmerge + (("node",) if dmerge else ()))
    al = gaps[[v for v in ALIGNMENT if v in gaps]]
    al.attrs = {}
    if "alignment_snapshot" not in al:
        al["alignment_snapshot"] = xr.full_like(al["alignment"], np.nan)
    al_attrs = {"k": settings["k"], **{v: gaps.attrs[v] for v in ALIGNMENT[:2]},
                "alignment_snapshot": "||U_k^T g|| / ||g|| per batch (U_k that batch's top-k Ritz vectors) for the "
                                      "gradient the run's snapshot store holds at the same step (the training "
                                      "gradient at these weights; grad_mode sketch: its stored rank-r part); NaN "
                                      "where the store holds no gradient at that step"}
    if run is not None:
        al_attrs.update(snapshots=str(run.path), snapshot_grad_mode=run.grad_mode)
    write_analysis(store, "hessian_alignment", al.expand_dims(step=[step]), al_attrs, merge=merge)
    g = gaps.drop_vars([v for v in ALIGNMENT if v in gaps]).expand_dims(step=[step])
    for a in ALIGNMENT:
        g.attrs.pop(a, None)
    preview = g if old is None or fresh else g.combine_first(old)
    checkpoints = {} if old is None or fresh else _attr_dict(old.attrs.get("checkpoints"))
    checkpoints[str(step)] = str(st.folder)
    attrs = {**settings, "checkpoints": dict(sorted(checkpoints.items(), key=lambda kv: int(kv[0]))),
             "uncertified": [f"step {int(s)} {u}" for s in preview.step.values
                             for u in uncertified(preview.sel(step=s))],
             "hvps_total": int(np.nansum(preview["hvps"].values))}
    if settings.get("hvp") == "fd":  # how fd products were made and certified (hessian_gaps' attrs)
        attrs.update({a: gaps.attrs[a] for a in ("richardson", "attention", "hvp_error", "certified")})
    write_analysis(store, "hessian_gap", g, attrs, merge=merge)
    return read_analysis(store, "hessian_gap").sortby("step")


def _vector_parts(store, st: Step, vecs: dict, settings: dict, fresh: bool) -> dict:
    """The sub-datasets of `hessian_vectors/s<step>`: this run's components, plus (a partial run) the stored
    components it did not recompute, when they come from the same settings and checkpoint."""
    parts = {}
    for (layer, comp), v in vecs.items():
        ds = xr.Dataset({"vectors": (("batch", "eig", "param"), np.asarray(v, dtype=np.float32))},
                        coords={"batch": np.arange(v.shape[0]), "eig": np.arange(1, v.shape[1] + 1)})
        parts[f"{layer}.{comp}"] = (ds, {"step": st.step, "layer": layer, "component": comp,
                                         "checkpoint": str(st.folder), **settings})
    if not fresh:
        for (layer, comp), attrs in _vector_attrs(store, st.step).items():
            name = f"{layer}.{comp}"
            if name not in parts and attrs.get("settings_id") == settings["settings_id"] and _same_folder(
                    attrs.get("checkpoint", ""), st.folder):
                ds = read_analysis(store, f"hessian_vectors/s{st.step}/{name}")
                for v in ds.variables.values():
                    v.encoding = {}
                parts[name] = (ds, None)
    return parts


# --------------------------------------------------------------------------- drift
def stored_vectors(store: str | Path, gap: xr.Dataset, step: int, layer: int, comp: str) -> np.ndarray | None:
    """The Ritz vectors (batch, k+1, n) stored for (step, layer, comp), None when there are none, or when they
    come from other settings or another checkpoint than the stored hessian_gap's at that step."""
    name = f"hessian_vectors/s{step}/{layer}.{comp}"
    if not (Path(store) / name / "zarr.json").is_file():
        return None
    ds = xr.open_zarr(store, group=name, consolidated=False)
    want = _attr_dict(gap.attrs.get("checkpoints")).get(str(step))
    if ds.attrs.get("settings_id") != gap.attrs.get("settings_id") or want is None or not _same_folder(
            ds.attrs.get("checkpoint", ""), want):
        return None
    return read_values(ds["vectors"], Path(store) / name / "vectors")


def hessian_drift(store: str | Path | None = None, *, gap: xr.Dataset | None = None,
                  vectors: Callable[[int, int, str], np.ndarray | None] | None = None) -> xr.Dataset:
    """The `hessian_drift` group over every step of a stored `hessian_gap` (module docstring): `eig_change` from
    its per-batch eigenvalues, `sin_theta` from the Ritz vectors stored with it.

    store: an analysis store holding hessian_gap (and hessian_vectors); or, in memory, `gap` (a hessian_gap
    Dataset with a step dimension) and `vectors(step, layer, component)` -> (batch, k+1, n) array or None."""
    if gap is None:
        if store is None:
            raise SpectraError("hessian_drift needs an analysis store, or gap= and vectors=")
        gap = read_analysis(store, "hessian_gap")
        vectors = vectors or (lambda s, l, c: stored_vectors(store, gap, s, l, c))
    if "step" not in gap.dims:
        raise SpectraError("hessian_gap has no step dimension: drift needs hessian-gap over several checkpoints")
    gap = gap.sortby("step")
    k = gap.sizes["eig"] - 1
    change = eigenvalue_change(gap["eigenvalues_batch"]).transpose("step", "layer", "component", "batch")
    sin = np.full(change.shape, np.nan)
    found = 0
    steps, layers, comps = gap.step.values, gap.layer.values, gap.component.values
    for li, layer in enumerate(layers):
        for ci, comp in enumerate(comps):
            prev = None
            for si, step in enumerate(steps):
                cur = vectors(int(step), int(layer), str(comp)) if vectors is not None else None
                found += cur is not None
                if cur is not None and prev is not None:
                    for b in range(min(cur.shape[0], prev.shape[0], sin.shape[3])):
                        P = orthonormal_top(torch.from_numpy(np.asarray(prev[b])), k)
                        Q = orthonormal_top(torch.from_numpy(np.asarray(cur[b])), k)
                        sin[si, li, ci, b] = math.sin(float(principal_angles(P, Q)[-1]))
                prev = cur
    ds = xr.Dataset({"eig_change": change.drop_vars([c for c in change.coords if c not in change.dims])},
                    attrs={"k": k, "eig_change": "||lambda_t - lambda_{t-1}|| / ||lambda_{t-1}|| over the top k "
                                                 "eigenvalues of each batch, consecutive stored steps; NaN at the "
                                                 "first step"})
    if found:
        ds["sin_theta"] = (change.dims, sin)
        ds.attrs["sin_theta"] = ("sine of the largest principal angle between the top-k Ritz subspaces (QR-"
                                 "orthonormalized) of this and the previous stored step, same batch = same tokens; "
                                 "NaN at the first step and where either step's vectors are not stored")
    else:
        ds.attrs["sin_theta"] = "not computed: no Ritz vectors stored (hessian-gap --keep-vectors)"
    return ds
