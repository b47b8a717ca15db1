"""`spectra spectrum`: singular-value spectra and heavy-tail metrics of every decoder linear,
per snapshot step, from a run's `snapshots.zarr` or from any HF causal-LM checkpoint folder.

One exact singular-value computation per matrix, by the fastest path for the device
(`spectra.analysis.heavytail.stream_singular_values`: float64 Gram eigenvalues over all cores on CPU, one
batched `svdvals` per shape on GPU). Writes group `spectrum` of
`analysis.zarr` with dims (step, layer, component, index); see `spectra.analysis.heavytail` for how every
metric is defined.

Streaming: a step's matrices are read one at a time (a checkpoint's straight from its safetensors,
a snapshot's from its Zarr chunks) and handed to the σ workers as they are read, at most two per
core in flight; only σ is kept. A 130m checkpoint never has all of its decoder weights in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer
import xarray as xr

from spectra.analysis.heavytail import (
    map_matrices,
    normalized_singular_values,
    spectrum_metrics,
    stream_singular_values,
)
from spectra.errors import SpectraError
from spectra.io.sources import (
    HUB_NAME,
    analysis_store_for,
    checkpoint_step,
    expand_paths,
    find_checkpoint,
    is_snapshot_store,
)
from spectra.models.parts import COMPONENTS, resolve_device
from spectra.progress import progress_bar

METRICS = ("full_rank", "stable_rank", "effective_rank", "entropy", "energy_top_r", "alpha",
           "alpha_weighted", "log_norm", "xmin", "ks_distance")

Weights = Iterable[tuple[tuple[int, str], torch.Tensor]]  # ((layer, component), W), read as iterated


# --------------------------------------------------------------------------- sources
def run_weights(path: Path, steps: list[int] | None) -> tuple[list[int], Iterator[tuple[int, Weights]]]:
    """The selected steps of a snapshot store and, per step, a lazy stream of ((layer, comp), W)."""
    from spectra.io.snapshots import open_run

    run = open_run(path)
    stored = [int(s) for s in run.steps]
    if not stored:
        raise SpectraError(f"{run.path} holds no committed snapshots")
    chosen = stored if not steps else steps
    missing = sorted(set(chosen) - set(stored))
    if missing:
        raise SpectraError(f"step(s) {missing} not in {run.path}; stored steps: {stored}")
    keys = run.keys()
    if not keys:
        raise SpectraError(f"{run.path} stores no decoder linear weights")
    arrays = {k: run.weight(*k) for k in keys}  # lazy; one step is read at a time

    def gen():
        for step in sorted(chosen):
            i = stored.index(step)
            yield step, ((k, torch.from_numpy(a.isel(step=i).values)) for k, a in arrays.items())

    return sorted(chosen), gen()


def checkpoint_series(paths: list[Path], steps: list[int] | None) -> tuple[list[int], Iterator[tuple[int, Weights]]]:
    """Steps of a series of HF checkpoint folders (from their names, or --steps in the same order)
    and, per checkpoint, a lazy stream of its matrices read straight from its safetensors."""
    from spectra.models.loading import stream_component_weights

    ckpts = [find_checkpoint(p) for p in paths]
    if steps:
        if len(steps) != len(ckpts):
            raise SpectraError(f"--steps gives {len(steps)} step(s) for {len(ckpts)} checkpoint folder(s)")
    elif len(ckpts) == 1:
        steps = [checkpoint_step(paths[0]) or checkpoint_step(ckpts[0]) or 0]
    else:
        steps = [
            checkpoint_step(p) if checkpoint_step(p) is not None else checkpoint_step(c) for p, c in zip(paths, ckpts)
        ]
        unnamed = [str(p) for p, s in zip(paths, steps) if s is None]
        if unnamed:
            raise SpectraError(
                f"cannot tell the training step of {unnamed[0]}: name the folders step<N> / step_<N> "
                "or pass --steps in the same order"
            )
    if len(set(steps)) != len(steps):
        raise SpectraError(f"two checkpoints share a step: {sorted(steps)}")
    order = sorted(range(len(ckpts)), key=steps.__getitem__)

    def gen():
        for i in order:
            _, weights = stream_component_weights(ckpts[i])
            yield steps[i], (((layer, comp), w) for layer, comp, w in weights)

    return [steps[i] for i in order], gen()


def checkpoint_weights(path: Path) -> tuple[list[int], Iterator[tuple[int, Weights]]]:
    """A single checkpoint is one "step": the number in a `step_N` / `stepN` folder name, else 0."""
    return checkpoint_series([path], None)


# --------------------------------------------------------------------------- analysis
def batched_singular_values(
    weights: Weights | Mapping[tuple[int, str], torch.Tensor], device: torch.device, step: int | None = None
) -> dict[tuple[int, str], torch.Tensor]:
    """σ of every matrix by the fastest exact path for `device`, streamed
    (spectra.analysis.heavytail.stream_singular_values): each matrix is checked finite, moved and decomposed
    as it is read, so only a few are in memory at once."""
    items = weights.items() if isinstance(weights, Mapping) else weights
    keys: list[tuple[int, str]] = []

    def checked():
        for (layer, comp), w in items:
            if not torch.isfinite(w).all():  # LAPACK would fail with a cryptic message
                at = f" at step {step}" if step is not None else ""
                raise SpectraError(f"non-finite weights in layer {layer} {comp}{at}")
            keys.append((layer, comp))
            yield w.to(device)

    svs = list(stream_singular_values(checked()))
    return dict(zip(keys, svs))


def spectrum_dataset(
    steps: list[int],
    weights_per_step: Iterator[tuple[int, Weights | Mapping[tuple[int, str], torch.Tensor]]],
    *,
    top_r: int,
    device: torch.device,
    progress: bool = True,
) -> xr.Dataset:
    """Build the `spectrum` dataset: sigma / sigma_norm (NaN-padded along index) and metrics."""
    sig: dict[tuple[int, int, str], np.ndarray] = {}
    metrics: dict[tuple[int, int, str], dict[str, float]] = {}
    for step, weights in progress_bar(
        weights_per_step, total=len(steps), desc="spectrum", unit="step", disable=not progress
    ):
        svs = batched_singular_values(weights, device, step)
        fits = map_matrices(lambda s: spectrum_metrics(s, top_r), [s.cpu() for s in svs.values()])
        for ((layer, comp), s), m in zip(svs.items(), fits):
            sig[(step, layer, comp)] = s.cpu().numpy()
            metrics[(step, layer, comp)] = m
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


# --------------------------------------------------------------------------- printing
def print_spectrum_table(ds: xr.Dataset) -> None:
    """Per component (mean over layers): first -> final step for the headline metrics."""
    from rich.console import Console
    from rich.table import Table

    first, last = ds.isel(step=0), ds.isel(step=-1)
    span = f"step {int(first.step)}→{int(last.step)}" if ds.sizes["step"] > 1 else f"step {int(last.step)}"
    t = Table(title=f"spectrum ({span}, mean over {ds.sizes['layer']} layers)")
    for col in ("component", "full rank", "stable rank", "eff. rank", "alpha", f"energy top-{ds.attrs['top_r']}"):
        t.add_column(col, justify="right" if col != "component" else "left")

    def cell(name: str, c: str, fmt: str) -> str:
        a, b = float(first[name].sel(component=c).mean()), float(last[name].sel(component=c).mean())
        return f"{b:{fmt}}" if ds.sizes["step"] == 1 else f"{a:{fmt}}→{b:{fmt}}"

    for c in ds.component.values:
        t.add_row(
            str(c),
            f"{float(last.full_rank.sel(component=c).mean()):.0f}",
            cell("stable_rank", c, ".1f"),
            cell("effective_rank", c, ".1f"),
            cell("alpha", c, ".2f"),
            cell("energy_top_r", c, ".3f"),
        )
    Console().print(t)


# --------------------------------------------------------------------------- command
def spectrum_command(
    run: Annotated[
        list[str],
        typer.Argument(
            help="A run folder or its snapshots.zarr (every snapshot step); or one or "
            "more HF checkpoint folders, a quoted glob or hub names (a "
            "checkpoint series: 'pythia/step*', EleutherAI/pythia-160m@step1000 "
            "...), steps from their names (step1000, step_1000) or --steps."
        ),
    ],
    out: Annotated[
        Optional[Path],
        typer.Option(
            help="Analysis store to write. Default: <run>/analysis.zarr (a series: "
            "<common parent>/analysis.zarr; one checkpoint: "
            "<checkpoint>/analysis.zarr)."
        ),
    ] = None,
    steps: Annotated[
        Optional[list[int]],
        typer.Option(
            "--snapshot-steps",
            "--steps",
            help="Snapshot steps to analyze (default: all); for checkpoint folders, the training step of each "
            "folder in order (repeat the option). --steps is the older spelling.",
        ),
    ] = None,
    top_r: Annotated[
        int, typer.Option(help="r for energy_top_r, the share of ||W||_F^2 in the top-r singular directions.")
    ] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N for the SVDs and fits.")] = "auto",
) -> None:
    """Singular values and heavy-tail metrics (stable/effective rank, energy, power-law alpha) of every decoder linear.

    For each layer x q/k/v/o/gate/up/down and each snapshot step (or checkpoint of a series):
    sigma, WeLore's min-max normalized sigma, stable rank, effective rank, energy in the top-r
    directions and the weightwatcher power-law alpha (MLE, x_min by KS distance). Any supported
    architecture (spectra.models.components). Writes group `spectrum` of analysis.zarr and prints how the
    metrics moved from the first to the last step. A series is read one checkpoint at a time.
    """
    import os

    from spectra.io.analysis_store import write_analysis
    from spectra.io.runs import run_dir_of

    if top_r < 1:
        raise SpectraError(f"--top-r must be >= 1, not {top_r}")
    paths = [Path(p) for p in expand_paths([run] if isinstance(run, (str, Path)) else run)]  # pipeline passes one path
    for path in paths:
        if not path.exists() and not HUB_NAME.fullmatch(str(path)):
            raise SpectraError(
                f"{path} does not exist (expected a run folder, snapshots.zarr, checkpoint folders or hub model names)"
            )
    dev = resolve_device(device)
    if len(paths) == 1 and is_snapshot_store(paths[0]):
        chosen, source = run_weights(paths[0], steps)
        default = analysis_store_for(paths[0])
    else:
        if any(is_snapshot_store(p) for p in paths):
            raise SpectraError("pass one run / snapshots.zarr, or checkpoint folders, not a mix")
        chosen, source = checkpoint_series(paths, steps)
        runs = {run_dir_of(p) for p in paths}
        hub = [str(p).partition("@")[0] for p in paths if not p.exists()]
        if hub:  # hub names: ./<org>/<name>/analysis.zarr, one store for all revisions of a model
            default = Path(hub[0]) / "analysis.zarr"
        elif len(paths) == 1 or (len(runs) == 1 and None not in runs):
            default = analysis_store_for(paths[0])
        else:
            default = Path(os.path.commonpath([p.resolve() for p in paths])) / "analysis.zarr"
    ds = spectrum_dataset(chosen, source, top_r=top_r, device=dev)
    source_label = str(paths[0]) if len(paths) == 1 else ", ".join(str(p) for p in paths)
    dest = write_analysis(out or default, "spectrum", ds, {"source": source_label})
    print_spectrum_table(ds)
    print(f"wrote group 'spectrum' to {dest}")
