"""The pipeline's embedded presets (pure data: `spectra pipeline --help` lists them without importing torch).

`quickstart` runs in a few CPU minutes (the README's first command); `cpu-reference` and `cpu-bytes` are the
CPU reference runs of reports/README.md; `130m` is the GPU reference run. Checkpoints are kept at every save
(keep_checkpoints 0) so `hessian-gap` can follow the Hessian through training (issue "the paper's theory").
"""

from __future__ import annotations

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
            save_every=30,  # 5 checkpoints: the Hessian at 5 steps, enough for a trend (4 intervals)
            keep_checkpoints=0,
            snapshot_every=25,
            snapshot_grad="full",
            val_tokens=16384,
        ),
        grad_rank=8,
        # the last two checkpoints, at most 60 HVPs per batch: about a minute on 2 cores (a trend over steps needs
        # 5 checkpoints, so Theorem 2.1's trend is "not testable here" in the quickstart; cpu-reference has them)
        hessian=dict(k=4, batches=2, batch_size=2, seq_len=64, iterations=60, last=2),
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
            keep_checkpoints=0,
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
            keep_checkpoints=0,
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
            keep_checkpoints=0,
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
