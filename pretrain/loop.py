"""The LLaMA pretraining loop that writes weight/gradient snapshots: `pretrain(cfg) -> Path` (the command
`spectra pretrain`, spectra/cli/pretrain.py, and the pipeline call it; its settings are pretrain/configs.py).

GaLore's 130m recipe is the default: AdamW lr 1e-3, 512 x 256-token sequences per step (by
gradient accumulation), linear warmup then cosine to 0.1 x lr, bf16 autocast on GPU and on CPUs with
native bf16 (AVX512-BF16, AMX), clipping 1.0. The loss goes through spectra.lm.loss (chunked lm_head + CE).
`--objective mlm` trains a BERT encoder of the same size instead (pretrain/configs.py): the same packed
windows (documents joined by the tokenizer's EOS, [SEP] for WordPiece), masked by transformers'
DataCollatorForLanguageModeling (15%; 80/10/10) from the seeded global RNG (checkpointed, so a resume
masks alike), the loss over the masked tokens only (spectra.lm.mlm.masked_lm_loss), validated on the fixed
masks of spectra.lm.mlm. Without --tokenizer it trains a WordPiece vocabulary on --data (cached).
Single process or `torchrun --nproc_per_node N -m spectra.cli pretrain ...` (DDP; nodes alike); with
`--strategy fsdp` FSDP2 shards parameters, gradients and optimizer state over the ranks (pretrain/fsdp.py).

Snapshot convention: snapshot `s` holds the weights after `s` optimizer updates (so it equals
checkpoint step_s bit for bit) and the gradient computed at exactly those weights, i.e. the
gradient of update s+1, after the DDP all-reduce (FSDP2: reduce-scatter, then gathered) and before
clipping and the optimizer step.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch
import transformers
import xarray
import zarr
from transformers import DataCollatorForLanguageModeling

from pretrain import fsdp
from pretrain.checkpoint import (
    load_trainer_state,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pretrain.configs import DEFAULT_TOKENIZER, MAX_POSITIONS, PretrainConfig, build_model, vocab_for
from pretrain.run_state import (
    METRICS,
    RUN_CONFIG,
    append_metrics,
    check_resume_config,
    has_run,
    read_run_config,
    record_run_config,
    refuse_restart,
    start_over,
    terminate_as_exception,
    truncate_metrics,
)
from spectra import distributed as dist_utils
from spectra.data import (
    PackedStream,
    Prefetcher,
    data_fingerprint,
    eval_windows,
    expand_files,
    load_hub_c4,
    load_local_docs,
    load_tokenizer,
    split_docs,
)
from spectra.data.wordpiece import cached_wordpiece
from spectra.errors import SpectraError
from spectra.io.atomic import atomic_write_json
from spectra.io.runs import latest_checkpoint, run_folder, run_lock
from spectra.io.snapshots import SnapshotWriter, component_records
from spectra.lm.evaluate import perplexity
from spectra.lm.loss import causal_lm_loss
from spectra.lm.mlm import MLM_RATE, masked_lm_loss, use_tokenizer
from spectra.progress import note, progress_bar
from spectra.schedule import warmup_cosine
from spectra.tracking import Tracker


def lr_lambda(cfg: PretrainConfig):
    """GaLore's schedule; warmup clamped to 10% of the steps so short runs still decay."""
    return warmup_cosine(min(cfg.warmup, max(1, cfg.steps // 10)), cfg.steps, cfg.min_lr_ratio)


class Trainer:
    """Holds model, optimizer, data and stores for one run; `fit()` runs the loop."""

    def __init__(self, cfg: PretrainConfig):
        if cfg.data:
            expand_files(cfg.data)  # fail on a bad --data before the slow parts
        self.fsdp = cfg.strategy == "fsdp"
        self.rank, self.world, self.device = dist_utils.setup(cfg.device, group=self.fsdp)
        if self.device.type == "cuda":  # fp32 parts of the step (optimizer, norms) run on tensor cores
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        per_rank = cfg.batch_size // cfg.micro_batch
        if per_rank % self.world:
            raise SpectraError(f"batch {cfg.batch_size} / micro {cfg.micro_batch} = {per_rank} micro-batches "
                               f"does not split over {self.world} ranks")
        self.accum = per_rank // self.world
        self.run_dir = run_folder(cfg.runs_dir, dist_utils.agree_run_id(cfg))
        if self.rank == 0:  # an unusable --runs-dir (under a file, read-only, a loop) fails before the slow parts
            self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg = replace(cfg, tokenizer=run_tokenizer(cfg, self.run_dir))
        self.tok = load_tokenizer(cfg.tokenizer)
        self.mlm = cfg.objective == "mlm"
        if self.mlm and self.tok.mask_token_id is None:
            raise SpectraError(f"--objective mlm needs a tokenizer with a mask token; {cfg.tokenizer} has none "
                               "(leave --tokenizer out to train a WordPiece vocabulary on --data)")
        torch.manual_seed(cfg.seed)
        if self.fsdp and self.mlm:
            raise SpectraError("--strategy fsdp trains decoders (--objective clm); use --strategy ddp for an encoder")
        self.model = build_model(cfg.model, vocab_for(len(self.tok)), cfg.seed, objective=cfg.objective,
                                 max_positions=cfg.seq_len if self.mlm else MAX_POSITIONS)
        if self.mlm:  # its [MASK] / special ids go into config.json: evaluation needs them, the tokenizer aside
            use_tokenizer(self.model, self.tok, overwrite=True)
            self.collator = DataCollatorForLanguageModeling(self.tok, mlm_probability=MLM_RATE)
        # the loss goes through the chunked lm_head + cross-entropy (no [tokens, vocab] logits kept for
        # backward); the wrapper is what DDP, FSDP2 and compile see, so they all work on the whole step
        loss = (_MLMLoss if self.mlm else _LMLoss)(self.model)
        if self.fsdp:  # sharded layer by layer from the host copy: the device never holds the whole model
            self.net = fsdp.shard(loss, self.device)
        else:
            self.model = self.model.to(self.device)
            self.net = dist_utils.wrap(loss, self.device, self.world)
        self.train_stream, self.val_windows = _data(cfg, self.tok, self.rank, self.world)
        self.data_files = data_fingerprint(cfg.data) if cfg.data else None
        # fused AdamW: one kernel per parameter group instead of a dozen per tensor (CPU too since torch 2.4)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                     weight_decay=cfg.weight_decay, fused=self.device.type in ("cuda", "cpu"))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.step, self.tokens = 0, 0
        self.bf16 = bf16 = self.device.type == "cuda" or (native_cpu_bf16() if cfg.cpu_bf16 is None else cfg.cpu_bf16)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.forward = torch.compile(self.net) if cfg.compile else self.net
        self.writer = None
        # FSDP2: whether rank 0 writes snapshots and what (every rank gathers it); set by prepare_run
        self.snapshot_follow = self.snapshot_grads = self.snapshot_embeddings = False
        self.tracker = None

    # ------------------------------------------------------------------ setup/resume
    def prepare_run(self) -> None:
        """Start, restart or resume the run folder (rank 0 holds its lock while this runs)."""
        cfg, run = self.cfg, self.run_dir
        exists = has_run(run)
        ckpt = latest_checkpoint(run) if (cfg.resume and exists) else None
        # rank 0 decides (it holds the lock; the others would see its first writes)
        exists, ckpt = dist_utils.broadcast((exists, ckpt))
        if exists and not cfg.resume and not cfg.overwrite:
            raise SpectraError(f"{run} already holds a run; pass --resume to continue it, --overwrite to start "
                               "it over, or another --run-id")
        changes: dict = {}
        if ckpt is not None:
            state = load_trainer_state(ckpt)
            if state["world"] != self.world:
                raise SpectraError(f"checkpoint was written by {state['world']} ranks, resuming with {self.world}")
            if state.get("strategy", "ddp") != cfg.strategy:
                raise SpectraError(f"{ckpt} was written by --strategy {state.get('strategy', 'ddp')}; resume with "
                                   "that strategy")
            changes = check_resume_config(state["config"], self.config_record(), cfg.allow_config_change)
            if self.fsdp:
                fsdp.load(ckpt, self.net, self.opt)
            else:
                load_weights(self.model, ckpt)
                self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            if {"lr", "warmup", "steps", "min_lr_ratio"} & set(changes):  # accepted: it applies from this step on
                self.apply_schedule()
            set_rng_state(state["rng"])
            self.train_stream.state = state["data"][self.rank]
            self.step, self.tokens = state["step"], state["tokens"]
        if self.rank == 0:
            if exists and ckpt is None and cfg.resume:
                refuse_restart(run, cfg.save_every)  # only a run killed before its first checkpoint restarts
            if exists and ckpt is None:  # --overwrite, or a resume of a run killed before its first checkpoint
                note(f"{run}: {'no checkpoint yet, starting over' if cfg.resume else 'overwriting'}")
                start_over(run)
            event = "resume" if ckpt is not None else ("restart" if exists else "start")
            run.mkdir(parents=True, exist_ok=True)
            record_run_config(run, self.config_record(), event, self.step, changes)
            truncate_metrics(run / METRICS, self.step)
            if cfg.snapshot_every > 0 or cfg.snapshot_steps:
                # FSDP2: written as gathered, one component at a time (no background copy of the whole model)
                self.writer = SnapshotWriter(run / "snapshots.zarr", _store_attrs(cfg, self.model),
                                             grad_mode=cfg.snapshot_grad, sketch_rank=cfg.sketch_rank,
                                             embeddings=cfg.snapshot_embeddings, background=not self.fsdp)
                # snapshots from the checkpoint's step on are retaken (the gradient at step N is computed
                # after the checkpoint), so the store goes back to what precedes it
                self.writer.truncate_after(self.step - 1 if self.step else -1)
        if self.fsdp:  # a reopened store keeps its own modes; every rank gathers what rank 0 writes
            w = self.writer
            self.snapshot_follow, self.snapshot_grads, self.snapshot_embeddings = dist_utils.broadcast(
                (True, w.grad_mode != "none", w.embeddings) if w is not None else (False, False, False))
        dist_utils.barrier()

    def apply_schedule(self) -> None:
        """The schedule of the current config at the current step: a resume's accepted --lr (or warmup,
        steps, min ratio) change replaces the saved base lr, which LambdaLR would otherwise keep."""
        lam = lr_lambda(self.cfg)
        self.sched.base_lrs = [self.cfg.lr for _ in self.opt.param_groups]
        for g in self.opt.param_groups:
            g["initial_lr"] = self.cfg.lr
            g["lr"] = self.cfg.lr * lam(self.sched.last_epoch)
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]

    def config_record(self) -> dict:
        """The run's settings as saved in checkpoints and run_config.json (plus the data files' sizes, and the
        precision actually used: a resume on a CPU without native bf16 would otherwise change it silently)."""
        return {**asdict(self.cfg), "data_files": self.data_files, "cpu_bf16": self.bf16}

    # ------------------------------------------------------------------ one step
    def accumulate(self, batches) -> float:
        """Forward/backward `accum` micro-batches; grads are the mean over the global batch."""
        # summed on the device in float64 (what the former per-micro-batch `float += loss.item()` did)
        # and read once per step: a .item() per micro-batch is a host sync that stalls a GPU queue
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(self.accum):
            x = next(batches)
            inputs = (x.to(self.device, non_blocking=True),)
            if self.mlm:  # masked on the CPU from the global RNG (rng_state in checkpoints)
                masked = self.collator(list(x))
                inputs = (masked["input_ids"].to(self.device), masked["labels"].to(self.device))
            sync = dist_utils.grad_sync(self.net, i == self.accum - 1)
            with sync, self.autocast:
                loss = self.forward(*inputs) / self.accum
            loss.backward()
            total += loss.detach()
            self.tokens += x.numel() * self.world
        loss = dist_utils.mean(total.item(), self.device)
        if not math.isfinite(loss):
            good = last_finite_checkpoint(self.run_dir, self.step)
            raise SpectraError(f"loss is {loss} at step {self.step}; last checkpoint with a finite loss: "
                               f"{good or 'none'} (lower --lr or check the data)")
        return loss

    def validate(self) -> tuple[float, float]:
        """Token-weighted mean loss over the fixed validation windows (sharded across ranks)."""
        if self.fsdp:  # every rank runs as many forwards (the layers are gathered from all of them)
            nll, n = fsdp.validate(self.net, self.val_windows, self.cfg.micro_batch, self.rank, self.world,
                                   self.device)
        else:
            shard = self.val_windows[self.rank :: self.world]
            mean, n = 0.0, 0
            if len(shard):
                mean, _, n = perplexity(self.model, shard, batch_size=self.cfg.micro_batch, device=self.device)
            nll = mean * n
        total_loss, total_n = dist_utils.sum_pair(nll, n, self.device)
        val = total_loss / max(total_n, 1)
        return val, math.exp(min(val, 50))

    def checkpoint(self) -> None:
        data_states = dist_utils.gather(self.batches.state)  # position after the last consumed batch
        if self.fsdp:
            if self.writer is not None:
                self.writer.wait()
            state = {"scheduler": self.sched.state_dict(), "rng": rng_state(), "data": data_states,
                     "step": self.step, "tokens": self.tokens, "world": self.world, "strategy": "fsdp",
                     "config": self.config_record()}  # model and optimizer: dcp/, sharded
            fsdp.save(self.run_dir, self.step, self.net, self.opt, state, self.cfg.keep_checkpoints, self.tok,
                      self.rank)
            return
        if self.rank == 0:
            if self.writer is not None:  # never publish a checkpoint past a snapshot still in flight
                self.writer.wait()
            state = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "rng": rng_state(),
                     "data": data_states, "step": self.step, "tokens": self.tokens, "world": self.world,
                     "config": self.config_record()}
            save_checkpoint(self.run_dir, self.step, self.model, state, self.cfg.keep_checkpoints, self.tok)
        dist_utils.barrier()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> Path:
        """Run (or resume) the loop. Rank 0 holds the run lock throughout; on an error, Ctrl-C or
        SIGTERM the snapshot in flight is finished (committed) before the process exits."""
        lock = run_lock(self.run_dir, "pretrain") if self.rank == 0 else nullcontext()
        try:
            with lock, terminate_as_exception():
                self.prepare_run()
                try:
                    self._loop()
                finally:
                    if self.writer is not None:
                        self._finish_writer()
                if self.fsdp:  # what sharding saved: every rank's bytes held and peak memory, in memory.json
                    ranks = dist_utils.gather(fsdp.memory_report(self.net, self.opt, self.device))
                    if self.rank == 0:
                        atomic_write_json(self.run_dir / "memory.json", {"strategy": "fsdp", "world": self.world,
                                                                         "ranks": ranks})
        except BaseException:
            if self.world == 1:  # a one-rank group (FSDP2 in one process) must not outlive a failed run
                dist_utils.teardown()
            raise
        dist_utils.teardown()
        return self.run_dir

    def _finish_writer(self) -> None:
        failing = sys.exc_info()[0] is not None
        try:
            self.writer.close()
        except SpectraError:
            if not failing:  # a clean exit must not hide a lost snapshot; a failing one keeps its own error
                raise

    def _loop(self) -> None:
        cfg = self.cfg
        self.model.train()
        if self.rank == 0 and cfg.log_to != "none":
            self.tracker = Tracker(cfg.log_to, self.run_dir, self.run_dir.name, self.config_record())
        self.batches = batches = Prefetcher(self.train_stream, cfg.micro_batch)
        bar = progress_bar(total=cfg.steps, initial=self.step, disable=self.rank != 0, desc=f"pretrain {cfg.model}",
                           unit="step")
        t0, tok0 = time.perf_counter(), self.tokens
        try:
            while True:
                tokens_before = self.tokens
                loss = self.accumulate(batches)
                if cfg.snapshot_at(self.step):
                    self.snapshot(tokens_before, loss)
                if self.step >= cfg.steps:  # the extra pass only served the final snapshot's gradient
                    self.opt.zero_grad(set_to_none=True)
                    break
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                lr = self.sched.get_last_lr()[0]
                self.opt.step()
                self.sched.step()
                self.opt.zero_grad(set_to_none=True)
                self.step += 1
                dt = time.perf_counter() - t0
                tps = (self.tokens - tok0) / max(dt, 1e-9)
                row = {"step": self.step, "loss": loss, "lr": lr, "tokens": self.tokens, "tokens_per_s": tps,
                       "elapsed_s": dt}
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    row["val_loss"], row["val_ppl"] = self.validate()
                self.log(row)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}",
                                **({"val_ppl": f"{row['val_ppl']:.1f}"} if "val_ppl" in row else {}))
                if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == cfg.steps):
                    self.checkpoint()
                # all ranks decide alike: a final snapshot needs one more (update-free) gradient pass
                if self.step >= cfg.steps and not cfg.snapshot_at(self.step):
                    break
        finally:  # also on errors: the prefetch thread must not outlive the loop
            bar.close()
            batches.close()
            if self.tracker is not None:
                self.tracker.close()

    def snapshot(self, tokens: int, loss: float) -> None:
        if self.fsdp and self.rank != 0:  # the gathers are collectives: follow rank 0's writer, keep nothing
            if self.snapshot_follow:
                _grad_norm(self.model)
                for _ in component_records(self.model, self.snapshot_embeddings, self.snapshot_grads, host=False):
                    pass
            return
        if self.writer is not None:
            self.writer.write(self.model, step=self.step, tokens=tokens, lr=self.sched.get_last_lr()[0],
                              loss=loss, grad_norm=_grad_norm(self.model))

    def log(self, row: dict) -> None:
        if self.rank == 0:
            append_metrics(self.run_dir / METRICS, row)
            if self.tracker is not None:
                self.tracker.log(row, row["step"])


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 autocast runs the
    matmuls 2-4x faster with a loss curve within 3e-4 of fp32 (bench/README.md); elsewhere bf16 is
    emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class _LMLoss(torch.nn.Module):
    """x -> mean next-token loss of the wrapped causal LM, equal to `model(input_ids=x, labels=x).loss`
    (tests/test_lm_loss.py) but through `spectra.lm.loss`'s chunked lm_head + cross-entropy."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.lm = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(self.lm, input_ids)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The full logits (validation under FSDP2, where this method carries the root's gather hooks)."""
        return self.lm(input_ids=input_ids).logits


class _MLMLoss(torch.nn.Module):
    """(masked ids, labels) -> mean CE over the masked tokens of the wrapped masked LM, equal to
    `model(input_ids=x, labels=labels).loss` (tests/test_encoder_mlm.py), vocabulary logits only where masked."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.lm = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return masked_lm_loss(self.lm, input_ids, labels)


def _grad_norm(model) -> float:
    """The global gradient norm (under FSDP2 each parameter's norm is reduced over the shards: every rank
    must call this)."""
    norms = [dist_utils.full(p.grad.detach().float().norm()) for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else float("nan")


def last_finite_checkpoint(run_dir: Path, step: int) -> Path | None:
    """The newest complete checkpoint before `step`: its weights gave a finite loss (checkpoint
    `step` itself holds the weights whose loss just came out non-finite)."""
    done = [p for p in (run_dir / "checkpoints").glob("step_*")
            if p.name.split("_")[1].isdigit() and int(p.name.split("_")[1]) < step
            and (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("_")[1]), default=None)


def run_tokenizer(cfg: PretrainConfig, run_dir: Path) -> str:
    """--tokenizer, or when not given the run's own (run_config.json) on --resume, else t5-base (mlm: a WordPiece
    vocabulary of --wordpiece-vocab trained on --data, spectra.data.wordpiece)."""
    if cfg.tokenizer is not None:
        return cfg.tokenizer
    saved = read_run_config(run_dir / RUN_CONFIG) if cfg.resume else {}
    if saved.get("tokenizer"):
        return saved["tokenizer"]
    if cfg.objective == "mlm":
        return str(cached_wordpiece(cfg.data, cfg.wordpiece_vocab).resolve())
    return DEFAULT_TOKENIZER


def _store_attrs(cfg: PretrainConfig, model) -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except Exception:  # noqa: BLE001
        sha = None
    return {"config": asdict(cfg), "model_config": model.config.to_dict(), "git_sha": sha,
            "param_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "zarr": zarr.__version__, "xarray": xarray.__version__, "python": sys.version.split()[0]}}


def _data(cfg: PretrainConfig, tok, rank: int, world: int):
    """(train PackedStream for this rank, fixed validation windows)."""
    if cfg.data:
        docs = load_local_docs(cfg.data)
        if cfg.val_data:
            train_idx, val_docs = None, load_local_docs(cfg.val_data)
        else:
            train_idx, val_idx = split_docs(docs, cfg.val_fraction, cfg.seed)
            val_docs = docs.select(val_idx)
        stream = PackedStream(docs, tok, cfg.seq_len, seed=cfg.seed, indices=train_idx, rank=rank, world=world)
    else:
        docs, val_docs = load_hub_c4("train"), load_hub_c4("validation")
        stream = PackedStream(docs, tok, cfg.seq_len, rank=rank, world=world)
    val = eval_windows(val_docs, tok, cfg.seq_len, cfg.val_tokens)
    return stream, val


def pretrain(cfg: PretrainConfig) -> Path:
    """Train (or, with `cfg.resume`, continue) the run `cfg` describes and return its folder. Prints nothing
    but progress (spectra.progress); bad settings or a run that must not be touched raise SpectraError."""
    return Trainer(cfg).fit()
