"""`rank_map`: the rank map of a model in memory or on disk, by any allocation method.

    rmap = spectra.rank_map(model, err=0.5)                                    # WeLore, data-free
    rmap = spectra.rank_map("runs/x", err=0.5, method="diagnostic")            # the run's analysis store
    rmap = spectra.rank_map(model, 0.5, method="loss", calibration=spectra.calibrate(model, batches))

The spectra come from the model's weights (one svdvals per matrix; a checkpoint folder is read
tensor by tensor, never loaded whole), the methods from spectra.compression.allocation, the
training-dynamics scores from spectra.compression.diagnostics, the loss estimates from
spectra.compression.calibration. The result is the rank-map contract of spectra.compression.rankmap;
`rank_map_dataset` is the same map as an xarray Dataset (dims layer, component).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import nn

from spectra.compression.allocation import MatrixSpectrum, build_rank_map, check_options, matrix_spectrum, ordered
from spectra.compression.calibration import Calibration, loss_direction_scores
from spectra.compression.diagnostics import diagnostic_scores
from spectra.compression.rankmap import map_entries, map_name
from spectra.errors import SpectraError
from spectra.io.analysis_store import write_analysis
from spectra.io.atomic import atomic_write_json
from spectra.io.sources import Source, resolve
from spectra.models.loading import load_model, stream_component_weights
from spectra.models.parts import COMPONENTS, component_parts, resolve_device
from spectra.progress import progress_bar


def model_spectra(model: nn.Module, device=None) -> list[MatrixSpectrum]:
    """Spectra of every component of a loaded model (spectra.models.components; one svdvals per matrix)."""
    return ordered([matrix_spectrum(p.layer, p.component, p.weight(m).detach(), device)
                    for p, m in progress_bar(component_parts(model), desc="svd", unit="matrix", leave=False)])


def checkpoint_spectra(path: str | Path, device=None) -> list[MatrixSpectrum]:
    """Spectra straight from a dense checkpoint's safetensors, one tensor in memory at a time."""
    n, weights = stream_component_weights(Path(path))
    return ordered([matrix_spectrum(layer, comp, W, device)
                    for layer, comp, W in progress_bar(weights, total=n, desc="svd", unit="matrix", leave=False)])


def _device(device) -> torch.device | None:
    return resolve_device(device) if isinstance(device, str) else device


def rank_map(
    model_or_path: nn.Module | str | Path | Source,
    err: float = 0.5,
    *,
    method: str = "welore",
    err_by: str = "rank",
    lrc_rule: str = "params",
    calibration: Calibration | None = None,
    analysis: str | Path | None = None,
    step: int | None = None,
    loss_weight: str = "auto",
    damping: float = 0.01,
    device: str | torch.device | None = None,
) -> dict:
    """The rank map hitting `err` (effective rank reduction, by "rank" or "params") with `method`:

        welore      one global threshold on min-max normalized singular values (the paper)
        uniform     the same rank fraction everywhere
        energy      one global threshold on σ²/‖W‖_F²
        diagnostic  uniform, reweighted by the `analysis` store's gradient-subspace / Hessian-gap scores
                    (default for a path: its analysis store), as of training `step` (default: the path's)
        loss        one global threshold on the estimated loss per unit saved; needs `calibration`

    `model_or_path`: a model in memory, or a dense checkpoint, run or hub name (`spectra.resolve`).
    Prints nothing; bad input is one SpectraError line."""
    check_options(method, err, err_by, lrc_rule)
    dev = _device(device)
    source = None
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
    else:
        source = model_or_path if isinstance(model_or_path, Source) else resolve(model_or_path)
        if source.compressed:
            raise SpectraError(f"{source.model_dir} is already compressed; rank its dense original "
                               "(or spectra compress --merge it)")
        model = None
        step = source.step if step is None else step
        analysis = source.analysis_store if analysis is None else analysis
    if method == "loss" and calibration is None:
        raise SpectraError("the loss method needs calibration statistics: calibration=spectra.calibrate(model, "
                           "batches) (spectra ranks: --calib-data)")
    if method == "diagnostic" and analysis is None:
        raise SpectraError("the diagnostic method needs an analysis store (analysis=...) holding grad_subspace "
                           "and/or hessian_gap results")
    if method == "loss" and model is None:
        model = load_model(source.need_model("the loss method"), device=dev or "cpu")
    spectra = model_spectra(model, dev) if model is not None else checkpoint_spectra(source.need_model("ranks"), dev)
    keys = [(s.layer, s.component) for s in spectra]
    scores = diagnostic_scores(analysis, keys, step) if method == "diagnostic" else None
    directions, extra = None, {}
    if method == "loss":
        directions, used = loss_direction_scores(model, calibration, keys, loss_weight, damping)
        extra = {"loss_weight": used, "damping": damping, "calibration": calibration.metadata()}
    out = build_rank_map(spectra, method, err, err_by, lrc_rule, scores, directions)
    out.update(extra)
    if source is not None:
        out["source"] = str(source.model_dir)
    return out


def rank_map_dataset(rank_map: dict) -> xr.Dataset:
    """The rank map as an xarray Dataset, dims (layer, component): full_rank, rank, lrc."""
    entries = map_entries(rank_map)
    layers = sorted({l for l, _ in entries})
    comps = [c for c in COMPONENTS if any(c == cc for _, cc in entries)]
    arr = {v: np.full((len(layers), len(comps)), -1, dtype=int) for v in ("full_rank", "rank")}
    lrc = np.zeros((len(layers), len(comps)), dtype=bool)
    for (l, c), e in entries.items():
        i, j = layers.index(l), comps.index(c)
        arr["full_rank"][i, j], arr["rank"][i, j], lrc[i, j] = e["full_rank"], e["rank"], e["lrc"]
    dims = ("layer", "component")
    return xr.Dataset(
        {"full_rank": (dims, arr["full_rank"]), "rank": (dims, arr["rank"]), "lrc": (dims, lrc)},
        coords={"layer": layers, "component": comps},
    )


def save_rank_map(rank_map: dict, dest: str | Path, store: str | Path | None = None) -> Path:
    """Write a rank map as JSON at `dest` (atomically) and, with `store`, as group `ranks/<map name>` of that
    analysis store (what the report and `spectra sweep` read)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(dest, rank_map)
    if store is not None:
        name = map_name(rank_map["method"], rank_map["target_err"], rank_map["err_by"])
        write_analysis(store, f"ranks/{name}", rank_map_dataset(rank_map),
                       {k: v for k, v in rank_map.items() if k != "components"})
    return dest
