"""`spectra pipeline`: the whole data path from an embedded preset (pretrain/presets.py), through the Python API.

pretrain -> snapshots.zarr -> spectrum / grad-subspace / the Hessian at every checkpoint (analysis.zarr) ->
rank maps at several ERRs -> compressed models -> perplexity -> finetuning (WeLore-PEFT vs LoRA vs GaLore vs
full) -> the paper's claims -> report.html. Each stage is an API call on objects in memory (the dense model is
loaded once) plus the save the matching command does, so the files are those the commands write.

The rank maps are the ones that earned their place in `spectra sweep` (reports/README.md): WeLore (the
paper's), uniform (its baseline), energy (the data-free threshold any new map must beat) and loss with
whitened truncation, calibrated on the preset's training text (stored once in the analysis store).

Presets use the offline data in ../shared/data (Wikipedia for pretraining, the real C4 sample for C4
perplexity) and the real T5 tokenizer (or bytes). The model therefore saw Wikipedia, not C4: C4 perplexities
are out-of-domain and not comparable with published C4-pretraining numbers.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

import spectra
from pretrain.configs import PretrainConfig
from pretrain.loop import pretrain
from pretrain.presets import MAPS, PRESETS, WHITENED
from reports.build import write_report
from spectra.analysis.claims_inputs import run_claims
from spectra.analysis.hessian import token_batches
from spectra.analysis.hessian_dynamics import checkpoint_steps, hessian_steps
from spectra.compression.calibration import stored_calibration
from spectra.compression.rankmap import err_tag
from spectra.compression.ranks import save_rank_map
from spectra.data import shared_data
from spectra.errors import SpectraError
from spectra.io.analysis_store import write_analysis
from spectra.io.atomic import atomic_write_json
from spectra.io.sources import load_source_tokenizer, resolve
from spectra.lm.evaluate import append_row, as_windows, eval_row
from spectra.lm.finetune import finetune_batches
from spectra.lm.recipe import FinetuneConfig
from spectra.models.compressed import save_compressed
from spectra.models.loading import load_causal_lm
from spectra.models.parts import resolve_device


def run_pipeline(preset: str = "quickstart", runs_dir: str = "runs", run_id: str | None = None,
                 steps: int | None = None, device: str = "auto", skip_pretrain: bool = False,
                 log: Callable[[str], None] = print) -> Path:
    """Every stage of the preset into runs/<run_id>; returns the run folder. `log` gets one line per stage."""
    if preset not in PRESETS:
        raise SpectraError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    data = shared_data()
    train, val = str(data / "wikipedia" / "train"), str(data / "wikipedia" / "validation")
    c4 = str(data / "c4" / "c4-train.00000-of-01024.first1000.jsonl.gz")
    tok_name = p.get("tokenizer") or str(data / "tokenizers" / "t5")
    run_id = run_id or f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = Path(runs_dir) / run_id
    stage = _stages(log)
    if not skip_pretrain:
        pre = {**p["pretrain"], **({"steps": steps} if steps is not None else {})}
        with stage("pretrain"):
            pretrain(PretrainConfig(data=train, val_data=val, tokenizer=tok_name, device=device, runs_dir=runs_dir,
                                    run_id=run_id, **pre))
    src = resolve(run)
    store, dev = src.analysis_store, resolve_device(device)
    with stage("spectrum"):
        write_analysis(store, "spectrum", spectra.spectrum(src, device=device, progress=False))
    with stage("grad-subspace"):
        write_analysis(store, "grad_subspace", spectra.grad_subspace(src, rank=p["grad_rank"], device=device,
                                                                     progress=False))
    model_dir = src.need_model("the pipeline")
    tok = load_source_tokenizer(src, tok_name)
    model = load_causal_lm(model_dir, device=dev)
    with stage("hessian-gap at every checkpoint"):
        h = dict(p["hessian"])
        ids = token_batches(val, tok, h.pop("seq_len"), h.pop("batches"), h.pop("batch_size"),
                            model.config.vocab_size)
        last = h.pop("last", None)  # only the last N checkpoints (a quickstart's minute), else every one
        chosen = [c.step for c in checkpoint_steps(src)][-last:] if last else None
        hessian_steps(src, ids, store, steps=chosen, data=val, device=device, progress=False, on_event=log, **h)
    eval_out = run / "eval.jsonl"
    eval_out.unlink(missing_ok=True)  # the table is rebuilt from scratch on every pipeline run
    windows = {d: as_windows(model, d, tok, p["eval_seq"], p["eval_tokens"]) for d in (val, c4)}

    def evaluate(lm, folder: Path, label: str | None = None) -> None:
        for d, w in windows.items():
            res = spectra.perplexity(lm, w, 8, dev)
            append_row(eval_out, eval_row(folder, res, d, p["eval_seq"], label))

    with stage("eval dense"):
        evaluate(model, model_dir)
    with stage("calibration"):  # the preset's training text calibrates the loss map and its whitening, stored once
        cal = stored_calibration(model, tok, train, p["calib"]["seqs"], p["calib"]["seq_len"], source=model_dir,
                                 store=store, write=True, device=dev)
    for method, label in MAPS:
        for err in p["errs"]:
            tag = f"{method}-{err_tag(err)}"
            with stage(f"rank map, compress and eval {tag}{' (whitened)' if method in WHITENED else ''}"):
                rmap = spectra.rank_map(model, err, method=method, calibration=cal if method == "loss" else None,
                                        analysis=store, step=src.step, device=dev)
                rmap["source"] = str(model_dir)
                save_rank_map(rmap, run / "ranks" / f"{tag}.json", store)
                small = spectra.compress(copy.deepcopy(model), rmap, device=dev, progress=False,
                                         calibration=cal if method in WHITENED else None)
                folder = run / "compressed" / tag
                save_compressed(small, rmap, folder, tokenizer=model_dir)
                evaluate(small, folder, label)
                del small
    for err in p["finetune_errs"]:
        folder = run / "compressed" / f"welore-{err_tag(err)}"
        f = p["finetune"]
        for method in ("welore", "lora", "galore", "full"):
            with stage(f"finetune {method} @ ERR {err:.0%}"):
                torch.manual_seed(0)
                lm = load_causal_lm(folder, device=dev)
                batches, val_windows = finetune_batches(train, val, tok, f["seq_len"], f["micro_batch"],
                                                        f["eval_tokens"])
                cfg = FinetuneConfig(method=method, **{k: v for k, v in f.items() if k not in ("seq_len",
                                                                                            "eval_tokens")})
                _, metrics = spectra.finetune(lm, batches, cfg, dev, val=val_windows)
                out = run / "finetune" / f"{method}-{err_tag(err)}"
                out.mkdir(parents=True, exist_ok=True)
                atomic_write_json(out / "metrics.json", {"method": method, "err": err, **metrics, "model": str(folder),
                                                         "data": train, "seq_len": f["seq_len"]})
    with stage("claims"):
        write_analysis(store, "claims", run_claims(store, run))
    with stage("report"):
        write_report(run, title=f"spectra {preset} run {run_id}")
    (run / "pipeline.json").write_text(json.dumps({"preset": preset, "stages": p, "data": str(data),
                                                   "tokenizer": tok_name}, indent=2))
    log(f"\nreport: {run / 'report.html'}")
    return run


def _stages(log: Callable[[str], None]):
    """`with stage(name):` logs the stage's start and its time."""

    @contextmanager
    def stage(name: str):
        t0 = time.perf_counter()
        log(f"\n== {name}")
        yield
        log(f"== {name} done in {time.perf_counter() - t0:.1f}s")

    return stage
