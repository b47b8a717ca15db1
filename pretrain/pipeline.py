"""`spectra pipeline`: the whole data path in one command, from an embedded preset.

pretrain -> snapshots.zarr -> spectrum / grad-subspace / hessian-gap (analysis.zarr) -> rank maps
at several ERRs -> compressed models -> perplexity -> finetuning comparison (WeLore-PEFT vs LoRA vs
GaLore vs full) -> report.html. Every stage is the same command a user would type; this file only
chooses their arguments.

The rank maps are the ones that earned their place in `spectra sweep` (reports/README.md): WeLore
(the paper's), uniform (its baseline), energy (the data-free threshold any new map must beat) and
loss with whitened truncation (the best map at 10-70% ERR), calibrated on the preset's training
text (`calib`: sequences x tokens, stored once in the analysis store and reused by ranks and
compress). `diagnostic` stays available as `spectra ranks --method diagnostic`; it lost every
cell from 40 to 80% ERR, so the pipeline no longer spends time on it.

Presets use the offline data in ../shared/data (Wikipedia for pretraining, the real C4 sample
for C4 perplexity) and the real T5 tokenizer. The model therefore saw Wikipedia, not C4: C4
perplexities are out-of-domain and not comparable with published C4-pretraining numbers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from spectra.compression.rankmap import err_tag
from spectra.errors import SpectraError

# (rank map method, label of its eval rows): the maps the pipeline compresses with, in report order
MAPS = (("welore", "welore"), ("uniform", "uniform"), ("energy", "energy"), ("loss", "loss-whitened"))
WHITENED = {"loss"}  # maps whose compression truncates in the whitened basis (compress --whiten)

# name -> stage arguments; `tiny` runs in a few CPU minutes, `130m` is the GPU reference run
PRESETS: dict[str, dict] = {
    # a few CPU minutes: the README's first command
    "quickstart": dict(
        pretrain=dict(
            model="tiny",
            steps=150,
            seq_len=128,
            batch_size=8,
            micro_batch=8,
            lr=3e-3,
            warmup=15,
            eval_every=50,
            save_every=50,
            snapshot_every=25,
            snapshot_grad="full",
            val_tokens=16384,
        ),
        grad_rank=8,
        hessian=dict(k=4, batches=2, batch_size=2, seq_len=64),
        calib=dict(seqs=64, seq_len=128),  # 8 k tokens: seconds on the tiny model
        errs=(0.1, 0.3, 0.5),
        eval_tokens=8192,
        eval_seq=128,
        finetune=dict(steps=10, batch_size=4, micro_batch=4, seq_len=128, eval_tokens=4096),
        finetune_errs=(0.5,),
    ),
    # the reference run when no GPU is lent: the largest config 2 CPU cores train in ~10 minutes
    "cpu-reference": dict(
        pretrain=dict(
            model="9m",
            steps=240,
            seq_len=128,
            batch_size=16,
            micro_batch=16,
            lr=3e-3,
            warmup=24,
            eval_every=40,
            save_every=60,
            snapshot_every=30,
            snapshot_grad="full",
            val_tokens=32768,
        ),
        grad_rank=8,
        hessian=dict(k=4, batches=2, batch_size=2, seq_len=128),
        calib=dict(seqs=256, seq_len=128),
        errs=(0.1, 0.2, 0.3, 0.4, 0.5),
        eval_tokens=16384,
        eval_seq=128,
        finetune=dict(steps=20, batch_size=8, micro_batch=8, seq_len=128, eval_tokens=8192),
        finetune_errs=(0.3, 0.5),
    ),
    # the same 9m on UTF-8 bytes (384 ids): without a 32k embedding the CPU's ~10 minutes go into the
    # decoder linears WeLore compresses (~3.3 M tokens, 7x the T5 run), so compression shows in ppl
    "cpu-bytes": dict(
        tokenizer="bytes",
        pretrain=dict(
            model="9m",
            steps=800,
            seq_len=256,
            batch_size=16,
            micro_batch=16,
            lr=3e-3,
            warmup=80,
            eval_every=100,
            save_every=200,
            snapshot_every=100,
            snapshot_grad="full",
            val_tokens=65536,
        ),
        grad_rank=8,
        hessian=dict(k=4, batches=2, batch_size=2, seq_len=256),
        calib=dict(seqs=256, seq_len=256),  # spectra sweep's default, the setting of reports/README.md
        # 70/90% too: below 50% a model this small loses < 0.2% ppl whatever the map
        errs=(0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9),
        eval_tokens=65536,
        eval_seq=256,
        finetune=dict(steps=40, batch_size=16, micro_batch=16, seq_len=256, eval_tokens=16384),
        finetune_errs=(0.3, 0.5),
    ),
    # the GPU reference run (one H100: about 20 minutes end to end)
    "130m": dict(
        pretrain=dict(
            model="130m",
            steps=2000,
            seq_len=256,
            batch_size=512,
            micro_batch=128,
            lr=1e-3,
            warmup=200,
            eval_every=250,
            save_every=500,
            snapshot_every=250,
            snapshot_grad="sketch",
            val_tokens=1 << 20,
        ),
        grad_rank=16,
        hessian=dict(k=8, batches=2, batch_size=32, seq_len=256),
        calib=dict(seqs=256, seq_len=256),
        errs=(0.1, 0.2, 0.3, 0.4, 0.5),
        eval_tokens=1 << 20,
        eval_seq=256,
        finetune=dict(steps=200, batch_size=64, micro_batch=32, seq_len=256, eval_tokens=1 << 18),
        finetune_errs=(0.3, 0.5),
    ),
}


def _stage(name: str, fn, **kw) -> None:
    t0 = time.perf_counter()
    print(f"\n== {name}", flush=True)
    fn(**kw)
    print(f"== {name} done in {time.perf_counter() - t0:.1f}s", flush=True)


def pipeline_command(
    preset: Annotated[str, typer.Option(help=f"embedded configuration: {', '.join(PRESETS)}")] = "quickstart",
    runs_dir: Annotated[str, typer.Option(help="parent folder of runs")] = "runs",
    run_id: Annotated[Optional[str], typer.Option(help="run folder name (default: <preset>-<timestamp>)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="override the preset's pretraining steps", min=1)] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    skip_pretrain: Annotated[bool, typer.Option(help="reuse the run's existing checkpoint and snapshots")] = False,
) -> None:
    """Run the whole WeLore pipeline (pretrain, analyze, rank, compress, eval, finetune, report) from a preset."""
    from pretrain.loop import PretrainConfig, pretrain
    from reports.build import write_report
    from spectra.analysis.hessian import hessian_gap_command
    from spectra.analysis.spectrum import spectrum_command
    from spectra.analysis.subspace import grad_subspace_command
    from spectra.cli.compress import command as compress_command
    from spectra.cli.eval import command as eval_command
    from spectra.cli.finetune import command as finetune_command
    from spectra.cli.ranks import command as ranks_command
    from spectra.data import shared_data

    if preset not in PRESETS:
        raise SpectraError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    data = shared_data()
    train, val = str(data / "wikipedia" / "train"), str(data / "wikipedia" / "validation")
    c4 = str(data / "c4" / "c4-train.00000-of-01024.first1000.jsonl.gz")
    tok = p.get("tokenizer") or str(data / "tokenizers" / "t5")
    run_id = run_id or f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = Path(runs_dir) / run_id
    pre = {**p["pretrain"], **({"steps": steps} if steps is not None else {})}
    if not skip_pretrain:
        _stage(
            "pretrain",
            lambda **kw: pretrain(PretrainConfig(**kw)),
            data=train,
            val_data=val,
            tokenizer=tok,
            device=device,
            runs_dir=runs_dir,
            run_id=run_id,
            **pre,
        )
    _stage("spectrum", spectrum_command, run=str(run), device=device)
    _stage("grad-subspace", grad_subspace_command, run=str(run), rank=p["grad_rank"], device=device)
    _stage("hessian-gap", hessian_gap_command, ckpt=str(run), data=val, tokenizer=tok, device=device, **p["hessian"])
    ev = dict(tokenizer=tok, seq_len=p["eval_seq"], tokens=p["eval_tokens"], device=device)
    eval_out = run / "eval.jsonl"
    if eval_out.exists():
        eval_out.unlink()  # the table is rebuilt from scratch on every pipeline run
    for dataset in (val, c4):
        _stage(f"eval dense on {Path(dataset).name}", eval_command, ckpt=str(run), data=dataset, out=eval_out, **ev)
    analysis = str(run / "analysis.zarr")
    # the preset's training text calibrates the loss map and its whitened truncation (one pass, stored)
    cal = dict(calib_data=train, tokenizer=tok, calib_seqs=p["calib"]["seqs"], calib_seq_len=p["calib"]["seq_len"])
    for method, label in MAPS:
        whiten = method in WHITENED
        for err in p["errs"]:
            tag = f"{method}-{err_tag(err)}"
            rank_map = run / "ranks" / f"{tag}.json"
            _stage(
                f"ranks {tag}",
                ranks_command,
                ckpt=str(run),
                err=err,
                method=method,
                analysis=analysis,
                out=str(rank_map),
                device=device,
                **(cal if method == "loss" else {}),
            )
            folder = run / "compressed" / tag
            _stage(
                f"compress {tag}{' (whitened)' if whiten else ''}",
                compress_command,
                ckpt=str(run),
                out=str(folder),
                rank_map=str(rank_map),
                device=device,
                **(dict(whiten=True, **cal) if whiten else {}),
            )
            for dataset in (val, c4):
                _stage(
                    f"eval {tag} on {Path(dataset).name}",
                    eval_command,
                    ckpt=str(folder),
                    data=dataset,
                    out=eval_out,
                    method=label,
                    **ev,
                )
    for err in p["finetune_errs"]:
        folder = run / "compressed" / f"welore-{err_tag(err)}"
        for method in ("welore", "lora", "galore", "full"):
            _stage(
                f"finetune {method} @ ERR {err:.0%}",
                finetune_command,
                ckpt=str(folder),
                method=method,
                data=train,
                val_data=val,
                tokenizer=tok,
                device=device,
                out=run / "finetune" / f"{method}-{err_tag(err)}",
                **p["finetune"],
            )
    _stage("report", write_report, run=run, title=f"spectra {preset} run {run_id}")
    (run / "pipeline.json").write_text(
        json.dumps({"preset": preset, "stages": p, "data": str(data), "tokenizer": tok}, indent=2)
    )
    print(f"\nreport: {run / 'report.html'}")
