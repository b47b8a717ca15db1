"""`spectra ranks`: a rank map for a target ERR (`spectra.rank_map`), written as JSON, with a per-layer table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from spectra.cli.args import CalibrationArgs, DeviceArgs, InputArgs, OutputArgs, TokenizerArgs
from spectra.cli.options import command_from
from spectra.config import opt


@dataclass
class RanksArgs(InputArgs, TokenizerArgs, CalibrationArgs, DeviceArgs, OutputArgs):
    err: float = opt(0.5, "Target effective rank reduction ERR in [0, 1).", min=0.0, max=1.0)
    method: Literal["welore", "uniform", "diagnostic", "energy", "loss"] = opt(
        "welore", "welore (global normalized-σ threshold), uniform (same rank fraction), diagnostic (Hessian gap / "
        "gradient-subspace stability of --analysis), energy (global σ²/‖W‖_F² threshold) or loss (estimated loss "
        "per unit saved, from --calib-data).")
    err_by: Literal["rank", "params"] = opt("rank", "Measure ERR by rank (paper) or by parameter count.")
    lrc_rule: Literal["params", "paper", "speed"] = opt(
        "params", "LRC = r(m+n) < m·n (params, per-shape break-even), r < 0.5·rank (paper), or r(m+n) ≤ 0.7·m·n "
                  "(speed: smaller and not slower, bench/inference.py).")
    analysis: Optional[str] = opt(
        None, "Analysis store for --method diagnostic and the calibration of --method loss (default: the run's "
              "analysis.zarr). Given, the map is also written there as group ranks/<name>.")


def print_table(rank_map: dict, console) -> None:
    """Per-layer table: kept rank per component, LRCs (factorized) in green."""
    from rich.table import Table

    from spectra.compression.rankmap import map_entries
    from spectra.models.components import COMPONENTS

    entries = map_entries(rank_map)
    comps = [c for c in COMPONENTS if any(c == cc for _, cc in entries)]
    table = Table(
        title=f"{rank_map['method']} ranks, ERR {rank_map['achieved_err']:.4f} by {rank_map['err_by']} "
        f"(target {rank_map['target_err']:.2f})",
        caption="green* = LRC (two factors), plain = N-LRC (dense)",
    )
    table.add_column("layer", justify="right")
    for c in comps:
        table.add_column(f"{c} /{next(e['full_rank'] for (l, cc), e in entries.items() if cc == c)}", justify="right")
    for layer in sorted({l for l, _ in entries}):
        cells = []
        for c in comps:
            e = entries.get((layer, c))
            cells.append("" if e is None else f"[green]{e['rank']}*[/]" if e["lrc"] else str(e["rank"]))
        table.add_row(str(layer), *cells)
    console.print(table)


def run(a: RanksArgs, path: str) -> None:
    from pathlib import Path

    from rich.console import Console

    from spectra.compression.allocation import check_options
    from spectra.compression.calibration import stored_calibration
    from spectra.compression.rankmap import map_name
    from spectra.compression.ranks import rank_map, save_rank_map
    from spectra.data import expand_files
    from spectra.errors import SpectraError
    from spectra.io.runs import check_own_output, is_rank_map
    from spectra.io.sources import load_source_tokenizer, resolve
    from spectra.models.loading import load_model
    from spectra.models.parts import resolve_device

    check_options(a.method, a.err, a.err_by, a.lrc_rule)
    if a.method == "loss" and a.calib_data:
        expand_files(a.calib_data, "--calib-data")
    source = resolve(path)
    model_dir = source.need_model("spectra ranks")
    if source.compressed:
        raise SpectraError(f"{model_dir} is already compressed; rank its dense original (or spectra compress --merge "
                           "it)")
    store = Path(a.analysis) if a.analysis else source.analysis_store
    if a.analysis and not store.exists():
        raise SpectraError(f"no analysis store at --analysis {store}")
    if a.method == "diagnostic" and not store.exists():
        raise SpectraError("--method diagnostic needs an analysis store: pass --analysis runs/<id>/analysis.zarr "
                           "(made by `spectra grad-subspace` / `spectra hessian-gap`)")
    name = map_name(a.method, a.err, a.err_by)
    dest = check_own_output(Path(a.out) if a.out else (source.run_dir or model_dir) / "ranks" / f"{name}.json",
                            is_rank_map)
    # the run's store is written only where the user asked for it: --analysis, or no --out (the run's defaults)
    write_store = a.analysis is not None or (a.out is None and (store.exists() or source.run_dir is not None))
    dev = resolve_device(a.device)
    model, cal = None, None
    if a.method == "loss":
        model = load_model(model_dir, device=dev)
        tok = load_source_tokenizer(source, a.tokenizer)
        cal = stored_calibration(model, tok, a.calib_data, a.calib_seqs, a.calib_seq_len, source=model_dir,
                                 store=store if store.exists() or write_store else None, write=write_store,
                                 device=dev)
    rmap = rank_map(model if model is not None else source, a.err, method=a.method, err_by=a.err_by,
                    lrc_rule=a.lrc_rule, calibration=cal, analysis=store, step=source.step,
                    loss_weight=a.loss_weight, damping=a.damping, device=dev)
    rmap["source"] = str(model_dir)
    save_rank_map(rmap, dest, store if write_store else None)
    console = Console()
    print_table(rmap, console)
    n_lrc = sum(e["lrc"] for e in rmap["components"])
    k = "" if rmap["k"] is None else f", k = {rmap['k']:.4g}" if a.method == "loss" else f", k = {rmap['k']:.5f}"
    if "estimated_cost" in rmap:
        k += f", estimated cost {rmap['estimated_cost']:.4g}"
    console.print(f"ERR by rank {rmap['err_rank']:.4f}, by params {rmap['err_params']:.4f}{k}; "
                  f"{n_lrc}/{len(rmap['components'])} LRCs -> {dest}")


command = command_from(
    RanksArgs, run,
    """WeLore rank map (or uniform / diagnostic baseline) for a target ERR, with a per-layer table.

    Also: --method energy (global threshold on σ²/‖W‖_F², data-free) and --method loss (estimated loss
    increase per unit saved, from calibration activations; encoders read one document per window with
    their tokenizer's own special tokens). The map goes to --out (default: <run>/ranks/<method>-err<NN>.json,
    else <checkpoint>/ranks/...); without --out it is also written into the run's analysis store, with
    --out only where --analysis names a store.""",
    inputs="one",
    input_help="Model folder (save_pretrained), a run folder (its latest checkpoint) or a hub name "
               "org/name[@revision].",
)
