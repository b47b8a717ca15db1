"""Singular-value spectra and heavy-tail metrics of every decoder linear (the `spectrum` analysis), per
snapshot step, of a model in memory, a run's `snapshots.zarr`, any checkpoint folder or a checkpoint series.

    ds = spectrum(model)                      # one step: the model as it is
    ds = spectrum("runs/20m")                 # every snapshot step of the run
    ds = spectrum(["ckpts/step1000", "ckpts/step2000"])   # a series, one step per checkpoint

One exact singular-value computation per matrix, by the fastest path for the device
(`spectra.analysis.heavytail.stream_singular_values`: float64 Gram eigenvalues over all cores on CPU, one
batched `svdvals` per shape on GPU). The Dataset has dims (step, layer, component, index); see
`spectra.analysis.heavytail` for how every metric is defined.

Streaming: a step's matrices are read one at a time (a checkpoint's straight from its safetensors,
a snapshot's from its Zarr chunks) and handed to the σ workers as they are read, at most two per
core in flight; only σ is kept. A 130m checkpoint never has all of its decoder weights in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from safetensors import SafetensorError, safe_open
from torch import nn

from spectra.analysis.heavytail import (
    map_matrices,
    normalized_singular_values,
    spectrum_metrics,
    stream_singular_values,
)
from spectra.errors import SpectraError
from spectra.io.snapshots import Run, open_run, param_key, read_values
from spectra.io.sources import Source, resolve
from spectra.models.loading import stream_component_weights
from spectra.models.parts import COMPONENTS, component_weights, resolve_device
from spectra.progress import progress_bar

METRICS = ("full_rank", "stable_rank", "effective_rank", "entropy", "energy_top_r", "alpha",
           "alpha_weighted", "log_norm", "xmin", "ks_distance")

Weights = Iterable[tuple[tuple[int, str], torch.Tensor]]  # ((layer, component), W), read as iterated
Steps = tuple[list[int], Iterator[tuple[int, Weights]]]  # the steps, and per step a lazy stream of its matrices


# --------------------------------------------------------------------------- the API
def spectrum(source: nn.Module | Run | Source | str | Path | Sequence[str | Path], *,
             steps: Sequence[int] | None = None, top_r: int = 32, device: str | torch.device = "auto",
             progress: bool = True) -> xr.Dataset:
    """σ, WeLore's min-max normalized σ and the heavy-tail metrics of every decoder linear, per step.

    source: a model in memory (nn.Module / PreTrainedModel: one step, labelled `steps[0]` if given, else 0),
    an opened snapshot store (`open_run`), or anything `spectra.resolve` takes: a run or snapshots.zarr (every
    snapshot step, or those in `steps`), a checkpoint folder or hub name (one step: its training step, or
    `steps[0]`), several checkpoint folders / a quoted glob (a series: one step per member, from their names or
    `steps` in the same order). A series must be one architecture with one set of tensor shapes, and a
    compressed folder is refused (its factors have no training step; `spectra compress --merge` it first).
    top_r: r of `energy_top_r`. Returns dims (step, layer, component, index); attrs `top_r` and `source`.
    """
    if isinstance(top_r, bool) or not isinstance(top_r, (int, np.integer)) or top_r < 1:
        raise SpectraError(f"top_r (--top-r) must be an integer >= 1, not {top_r!r}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    chosen, weights, label = spectrum_input(source, steps)
    ds = spectrum_dataset(chosen, weights, top_r=int(top_r), device=dev, progress=progress, where=label)
    ds.attrs["source"] = label
    return ds


def spectrum_input(source, steps: Sequence[int] | None) -> tuple[list[int], Iterator[tuple[int, Weights]], str]:
    """(steps, per-step weight streams, a label naming the input) for `spectrum`; every check that can fail
    (a missing step, a mixed series, a corrupt safetensors header) runs here, before any σ is computed."""
    steps = None if steps is None else [_step(s) for s in steps]
    if isinstance(source, nn.Module):
        step = _one_label(steps, "an in-memory model")
        weights = {k: w.detach() for k, w in component_weights(source).items()}
        return [step], iter([(step, weights)]), f"in-memory {type(source).__name__}"
    if isinstance(source, Run):
        return (*run_weights(source, steps), str(source.path))
    if isinstance(source, Source):
        if steps and source.kind == "series":
            raise SpectraError("give a series' steps to spectra.resolve(..., steps=), not to spectrum()")
        src = source
    else:
        src = resolve(source, steps=steps)
    if src.kind == "series":
        check_series(src.members)
        return (*checkpoint_weights([(m.step, m.model_dir) for m in src.members]), src.text)
    if src.compressed:
        raise SpectraError(f"{src.text} is a compressed model: its low-rank factors have no training step and their "
                           "spectrum is not the checkpoint's; `spectra compress --merge` it into a dense folder "
                           "first and analyze that")
    if src.kind in ("run", "snapshots") and src.snapshots is not None:
        return (*run_weights(open_run(src.snapshots), steps), src.text)
    folder = src.need_model("spectrum")
    step = _one_label(steps, src.text) if steps else (src.step if src.step is not None else 0)
    check_series([src])  # a readable config and safetensors header, named when not
    return (*checkpoint_weights([(step, folder)]), src.text)


def _step(s) -> int:
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
        raise SpectraError(f"steps (--steps) are training steps (integers >= 0), not {s!r}")
    return int(s)


def _one_label(steps: list[int] | None, what: str) -> int:
    if steps and len(steps) != 1:
        raise SpectraError(f"{what} is one step; --steps gives {len(steps)}")
    return steps[0] if steps else 0


# --------------------------------------------------------------------------- sources
def run_weights(run: Run, steps: Sequence[int] | None) -> Steps:
    """The selected steps of an opened snapshot store and, per step, a lazy stream of ((layer, comp), W)."""
    stored = [int(s) for s in run.steps]
    chosen = sorted(set(stored if not steps else steps))
    missing = sorted(set(chosen) - set(stored))
    if missing:
        raise SpectraError(f"step(s) {missing} not in {run.path}; stored steps: {stored}")
    keys = run.keys()
    if not keys:
        raise SpectraError(f"{run.path} stores no decoder linear weights")
    arrays = {k: run.weight(*k) for k in keys}  # lazy; one step is read at a time

    def read(key: tuple[int, str], step: int) -> torch.Tensor:
        a = arrays[key].isel(step=stored.index(step))
        return torch.from_numpy(read_values(a, run.path / "params" / param_key(*key) / "weight", f" (step {step})"))

    def gen():
        for step in chosen:
            yield step, ((k, read(k, step)) for k in arrays)

    return chosen, gen()


def checkpoint_weights(members: Sequence[tuple[int, Path]]) -> Steps:
    """(step, checkpoint folder) pairs, ordered by step, each a lazy stream of its matrices read straight
    from its safetensors (spectra.models.loading.stream_component_weights)."""
    order = sorted(members, key=lambda m: m[0])
    if len({s for s, _ in order}) != len(order):
        raise SpectraError(f"two checkpoints share a step: {[s for s, _ in order]}")

    def gen():
        for step, folder in order:
            _, weights = stream_component_weights(folder)
            yield step, (((layer, comp), w) for layer, comp, w in weights)

    return [s for s, _ in order], gen()


def layout(folder: Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(architecture, {tensor: shape}) of a checkpoint folder, from config.json and the safetensors headers
    (no tensor data is read); a folder of other weight files has an empty shape map."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
        arch = str((cfg.get("architectures") or [None])[0] or cfg.get("model_type"))
    except (OSError, ValueError, AttributeError) as e:
        raise SpectraError(f"cannot read {folder / 'config.json'} ({type(e).__name__}); the checkpoint is "
                           "damaged") from None
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(f, "pt") as st:
                shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
        except (SafetensorError, OSError) as e:
            why = " ".join(str(e).split())[:160]
            raise SpectraError(f"cannot read {f} ({type(e).__name__}: {why}); the file is truncated or "
                               "corrupt") from None
    return arch, shapes


def check_series(members: Sequence[Source]) -> None:
    """A series is one model at several steps: the same architecture and the same tensors with the same shapes
    in every member, else one line naming the member and the tensor (before anything is computed or written).
    A compressed member is refused (its factors are no training step of the dense model)."""
    ref = None
    for m in members:
        if m.compressed and len(members) > 1:
            raise SpectraError(f"{m.text} is a compressed model; a series is dense checkpoints of one model "
                               "(`spectra compress --merge` it first)")
        arch, shapes = layout(m.model_dir)
        if ref is None:
            ref = (m, arch, shapes)
            continue
        r, r_arch, r_shapes = ref
        if arch != r_arch:
            raise SpectraError(f"the series mixes architectures: {m.text} is {arch}, {r.text} is {r_arch}; "
                               "analyze each model on its own")
        if r_shapes and shapes:
            for name in sorted(set(r_shapes) | set(shapes)):
                a, b = shapes.get(name), r_shapes.get(name)
                if a != b:
                    has = f"has {name} with shape {list(a)}" if a is not None else f"has no tensor {name}"
                    there = f"{list(b)}" if b is not None else "absent"
                    raise SpectraError(f"{m.text} {has} ({r.text}: {there}); a series must be one model with "
                                       "one set of shapes")


# --------------------------------------------------------------------------- analysis
def batched_singular_values(
    weights: Weights | Mapping[tuple[int, str], torch.Tensor], device: torch.device, step: int | None = None,
    where: str | None = None,
) -> dict[tuple[int, str], torch.Tensor]:
    """σ of every matrix by the fastest exact path for `device`, streamed
    (spectra.analysis.heavytail.stream_singular_values): each matrix is checked finite, moved and decomposed
    as it is read, so only a few are in memory at once."""
    items = weights.items() if isinstance(weights, Mapping) else weights
    keys: list[tuple[int, str]] = []
    at = (f" at step {step}" if step is not None else "") + (f" of {where}" if where else "")

    def checked():
        for (layer, comp), w in items:
            if not torch.isfinite(w).all():  # LAPACK would fail with a cryptic message
                raise SpectraError(f"non-finite weights in layer {layer} {comp}{at}")
            keys.append((layer, comp))
            yield w.to(device)

    svs: list[torch.Tensor] = []
    try:
        for s in stream_singular_values(checked()):
            svs.append(s)
    except (torch.linalg.LinAlgError, np.linalg.LinAlgError) as e:  # results come back in order: the next key failed
        layer, comp = keys[len(svs)]
        raise SpectraError(f"the eigenvalue solver failed on layer {layer} {comp}{at} "
                           f"({' '.join(str(e).split())[:160]})") from None
    return dict(zip(keys, svs))


def spectrum_dataset(
    steps: list[int],
    weights_per_step: Iterator[tuple[int, Weights | Mapping[tuple[int, str], torch.Tensor]]],
    *,
    top_r: int,
    device: torch.device,
    progress: bool = True,
    where: str | None = None,
) -> xr.Dataset:
    """Build the `spectrum` dataset: sigma / sigma_norm (NaN-padded along index) and metrics."""
    sig: dict[tuple[int, int, str], np.ndarray] = {}
    metrics: dict[tuple[int, int, str], dict[str, float]] = {}
    for step, weights in progress_bar(
        weights_per_step, total=len(steps), desc="spectrum", unit="step", disable=not progress
    ):
        svs = batched_singular_values(weights, device, step, where)
        fits = map_matrices(lambda s: spectrum_metrics(s, top_r), [s.cpu() for s in svs.values()])
        for ((layer, comp), s), m in zip(svs.items(), fits):
            sig[(step, layer, comp)] = s.cpu().numpy()
            metrics[(step, layer, comp)] = m
    if not sig:
        raise SpectraError(f"{where or 'the input'} has no decoder linear weights to analyze")
    layers = sorted({l for _, l, _ in sig})
    comps = [c for c in COMPONENTS if any(k[2] == c for k in sig)]
    n_index = max(v.size for v in sig.values())
    shape = (len(steps), len(layers), len(comps))
    sigma = np.full((*shape, n_index), np.nan, dtype=np.float32)
    sigma_norm = np.full_like(sigma, np.nan)
    vals = {m: np.full(shape, np.nan) for m in METRICS}
    for (step, layer, comp), s in sig.items():
        idx = (steps.index(step), layers.index(layer), comps.index(comp))
        sigma[idx][: s.size] = s
        sigma_norm[idx][: s.size] = normalized_singular_values(torch.from_numpy(s)).numpy()
        for m, v in metrics[(step, layer, comp)].items():
            vals[m][idx] = v
    dims = ("step", "layer", "component")
    ds = xr.Dataset(
        {
            "sigma": (dims + ("index",), sigma),
            "sigma_norm": (dims + ("index",), sigma_norm),
            **{m: (dims, v) for m, v in vals.items()},
        },
        coords={
            "step": np.asarray(steps, dtype=np.int64),
            "layer": layers,
            "component": np.array(comps, dtype=object),
            "index": np.arange(n_index),
        },
    )
    ds.attrs["top_r"] = top_r
    return ds
