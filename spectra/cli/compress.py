"""`spectra compress`: a compressed Hugging Face folder from a dense checkpoint (`spectra.compress`, streamed
by spectra.compression.stream when it can be), or a dense one back from it (`spectra.merge`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from spectra.cli.args import CalibrationArgs, DeviceArgs, InputArgs, OutputArgs, OverwriteArgs, TokenizerArgs
from spectra.cli.options import command_from
from spectra.config import opt


@dataclass
class CompressArgs(InputArgs, TokenizerArgs, CalibrationArgs, DeviceArgs, OutputArgs, OverwriteArgs):
    rank_map: Optional[str] = opt(None, "Rank map JSON from `spectra ranks`. Default: a --method map for --err, "
                                        "derived in the same pass as the factors (one decomposition per matrix).")
    err: float = opt(0.5, "Target effective rank reduction of the map derived on the fly (by rank, params "
                          "break-even LRC rule, as `spectra ranks`).", min=0.0, max=1.0)
    method: Literal["welore", "uniform", "energy"] = opt(
        "welore", "Method of the map derived on the fly (see `spectra ranks`); diagnostic and loss maps come from "
                  "`spectra ranks` (--rank-map).")
    merge: bool = opt(False, "Turn a compressed folder back into dense weights (W = B·A) instead.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Weights dtype of the output: auto (as stored), float32, bfloat16 or float16.")
    whiten: bool = opt(False, "Activation-aware truncation (SVD of W·S, C = XᵀX = S·Sᵀ from --calib-data; "
                              "compression/whiten.py). Loads the whole model (not streamed).")
    compensate: Literal["none", "sequential", "refit"] = opt(
        "none", "Compensated calibration on --calib-data (compression/sequential.py; whitened, so it implies "
                "--whiten): layer by layer, each linear is fit on the compressed model's own inputs to give the dense "
                "layer's outputs. sequential: the whitened truncation of the compensated map; refit: the dense "
                "whitened input factor, the output factor refit by least squares. Streamed for a safetensors "
                "LLaMA-family checkpoint (one decoder layer at a time); other architectures load the whole model.")


def run(a: CompressArgs, path: str) -> None:
    from pathlib import Path

    import torch
    from rich.console import Console

    from spectra.compression.allocation import check_options
    from spectra.compression.calibration import calibration_windows, stored_calibration
    from spectra.compression.lowrank import compress, merge, param_count
    from spectra.compression.rankmap import entries_for, load_rank_map
    from spectra.compression.ranks import rank_map
    from spectra.compression.sequential import STREAMED_ARCHITECTURES
    from spectra.compression.stream import Checkpoint, NotStreamable, config_dtype, skeleton, stream_compress
    from spectra.data import expand_files
    from spectra.errors import SpectraError
    from spectra.io.runs import check_own_output
    from spectra.io.sources import load_source_tokenizer, resolve
    from spectra.models.compressed import load_compressed, save_compressed, save_dense
    from spectra.models.loading import load_model
    from spectra.models.parts import model_class, resolve_device

    if a.out is None:
        raise SpectraError("missing --out FOLDER: where the compressed (or, with --merge, dense) model goes")
    check_options(a.method, a.err, "rank", "params")
    whiten = a.whiten or a.compensate != "none"
    if whiten and a.calib_data:
        expand_files(a.calib_data, "--calib-data")
    source = resolve(path)
    model_dir, dst = source.need_model("spectra compress"), Path(a.out)
    if dst.resolve() == model_dir.resolve():
        raise SpectraError("--out must differ from the input folder (its weights are read while writing)")
    check_own_output(dst, overwrite=a.overwrite)
    want = None if a.dtype == "auto" else getattr(torch, a.dtype)
    console = Console()
    if a.merge:
        if not source.compressed:
            raise SpectraError(f"{model_dir} is not a compressed model (no spectra_rank_map.json); nothing to merge")
        save_dense(merge(load_compressed(model_dir, dtype=want)), dst, tokenizer=model_dir)
        console.print(f"merged {model_dir} -> dense {dst}")
        return
    if source.compressed:
        raise SpectraError(f"{model_dir} is already compressed; use --merge to get dense weights back first")
    rmap = load_rank_map(a.rank_map) if a.rank_map is not None else None  # bad input fails before any work
    try:
        ckpt = Checkpoint(model_dir)  # safetensors under the modules' names: streamed (weights checked floating)
    except NotStreamable:
        ckpt = None
    if rmap is not None:  # a map of another model fails before any work, naming the file
        entries_for(ckpt.skeleton if ckpt is not None else skeleton(model_dir), rmap, f"rank map {a.rank_map}")
    dev = resolve_device(a.device)
    # the compensation streams one decoder layer at a time where the architecture allows; the whitener needs
    # the loaded model's activations
    compensated = a.compensate != "none"
    streamed = ckpt is not None and (
        not whiten or (compensated and ckpt.skeleton.config.model_type in STREAMED_ARCHITECTURES))
    if streamed:
        windows = None
        if compensated:
            windows = calibration_windows(ckpt.skeleton, load_source_tokenizer(source, a.tokenizer), a.calib_data,
                                          a.calib_seqs, a.calib_seq_len)
        rmap, counts = stream_compress(ckpt, dst, rank_map=rmap, method=a.method, err=a.err, dtype=want, device=dev,
                                       compensation=a.compensate if compensated else None, batches=windows,
                                       damping=a.damping)
        before = (counts["linear_before"], counts["total_before"])
        after = (counts["linear_after"], counts["total_after"])
    else:
        model = load_model(model_dir, dtype=want or config_dtype(model_class(model_dir)[1]))
        if rmap is None:  # the global threshold needs every spectrum before any matrix is cut
            rmap = rank_map(model, a.err, method=a.method, device=dev)
        before = param_count(model)
        cal, windows = None, None
        if a.compensate != "none":  # its own statistics, layer by layer on the model being compressed
            windows = calibration_windows(model, load_source_tokenizer(source, a.tokenizer), a.calib_data,
                                          a.calib_seqs, a.calib_seq_len)
        elif a.whiten:  # reused from the run's analysis store when ranks stored the same calibration; never written
            store = source.analysis_store
            cal = stored_calibration(model, load_source_tokenizer(source, a.tokenizer), a.calib_data, a.calib_seqs,
                                     a.calib_seq_len, source=model_dir, store=store if store.exists() else None,
                                     device=dev)
        compress(model, rmap, calibration=cal, damping=a.damping, device=dev,
                 compensation=None if windows is None else a.compensate, batches=windows)
        after = param_count(model)
        save_compressed(model, rmap, dst, tokenizer=model_dir)
    comp = (", whitened" if whiten else "") + (f", {a.compensate}" if a.compensate != "none" else "")
    n_lrc = sum(bool(e["lrc"]) for e in rmap["components"])
    console.print(
        f"{rmap['method']} map, ERR {rmap['achieved_err']:.4f} ({rmap['err_by']}){comp}: "
        f"{n_lrc}/{len(rmap['components'])} linears low-rank; decoder-linear params {before[0]:,} -> {after[0]:,} "
        f"({after[0] / before[0]:.3f}x), model {before[1]:,} -> {after[1]:,}; saved {dst}"
    )


command = command_from(
    CompressArgs, run,
    """WeLore-COMP: replace LRC linears with low-rank factors (or --merge them back to dense).

    A safetensors checkpoint (sharded or not) is streamed: one decoder layer at a time is read and
    written, and without --rank-map the map is derived in the same pass, one decomposition per
    matrix (spectra/compression/stream.py). --compensate streams too on LLaMA-family checkpoints, one layer
    built and calibrated at a time. --whiten, --compensate on other architectures, and checkpoints in other
    formats, load the model.
    --out (required) is a Hugging Face folder (load with trust_remote_code=True) + spectra_rank_map.json;
    nothing is written anywhere else.""",
    inputs="one",
    input_help="Model folder (any supported architecture), a run folder (its latest checkpoint) or a hub name. "
               "With --merge: a compressed folder.",
)
