"""`spectra pretrain --strategy fsdp`: the FSDP2 engine (torch.distributed.fsdp.fully_shard), as torchtitan and
torchtune shard a decoder: each decoder layer is one FSDP unit, the root (embeddings, final norm, lm_head) another.
Parameters, gradients and AdamW moments live sharded (dim 0 over the ranks); a layer is whole only while it
computes. Runs on CPU (gloo) and GPU (NCCL) alike; a single process gets a one-rank group.

A checkpoint folder under FSDP2 holds, besides what the DDP path writes (pretrain/checkpoint.py):

    dcp/                    torch.distributed.checkpoint: model + optimizer, one shard file per rank (resume
                            reads only its own shards, so the model is never whole anywhere)
    model.safetensors       the same weights as a plain `save_pretrained` folder (config.json, tokenizer),
                            gathered one tensor at a time and written by rank 0 in shards of at most
                            EXPORT_SHARD_BYTES (an index file when there are several): every published checkpoint
                            loads in any HF tool and spectra analyzer, and equals the DDP run's layout

Both go into the temporary folder first and are published by the same rename and `latest` switch as the
DDP path, so a kill at any moment leaves the previous checkpoint intact; a non-finite tensor on any rank
stops the publish on every rank. `spectra.models.dcp.dcp_to_pretrained` converts a bare dcp/ folder.
"""

from __future__ import annotations

import json
import math
import resource

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import register_fsdp_forward_method
from transformers.utils import logging as hf_logging

from pretrain.checkpoint import fresh_tmp, publish
from spectra import distributed as dist_utils
from spectra.errors import SpectraError
from spectra.io.runs import latest_checkpoint
from spectra.lm.precision import autocast_for, use_bf16
from spectra.models.dcp import DCP_DIR
from spectra.models.sharding import shard_model

EXPORT_SHARD_BYTES = 2 << 30  # rank 0's host holds at most this much of the exported weights at once


def shard(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """fully_shard every decoder layer of `net.lm`, then `net` itself (the training root, `_LMLoss`); its
    `logits` method (validation) gets the root's unshard/reshard hooks too."""
    shard_model(net, device, blocks=net.lm.get_decoder().layers)
    register_fsdp_forward_method(net, "logits")
    return net


@torch.no_grad()
def validate(net, windows: torch.Tensor, batch_size: int, rank: int, world: int, device) -> tuple[float, int]:
    """(summed NLL, tokens) of this rank's windows (`windows[rank::world]`, batched as the DDP path's
    `score` does, fp32 log-softmax). Every rank runs the same number of forwards (each gathers the layers
    from every rank): a rank with fewer windows repeats one and discards it."""
    shard_ = windows[rank::world]
    n_batches = math.ceil(len(windows[0::world]) / batch_size)
    net.eval()
    total, n = 0.0, 0
    try:
        for i in range(n_batches):
            x = shard_[i * batch_size : (i + 1) * batch_size]
            real = len(x) > 0
            x = (x if real else windows[:1]).to(device)
            with autocast_for(device, use_bf16(device, cpu_bf16=False)):
                logits = net.logits(x)
            logits = logits[:, :-1].flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
            nll = F.cross_entropy(logits, x[:, 1:].flatten(), reduction="sum")
            if real:
                total += nll.double().item()
                n += x[:, 1:].numel()
    finally:
        net.train()
    return total, n


def all_finite(net) -> bool:
    """Every rank's shard of every floating tensor finite (one all-reduce; the same answer on every rank)."""
    ok = all(bool(torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all())
             for t in net.lm.state_dict().values() if t.is_floating_point())
    flag = torch.tensor([1.0 if ok else 0.0], device=next(net.parameters()).to_local().device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save(run_dir, step: int, net, opt, state: dict, keep: int, tokenizer, rank: int):
    """Write checkpoint `step` of the sharded `net` + `opt` (every rank calls this) and publish it (rank 0)."""
    ckpt_root = run_dir / "checkpoints"
    if not all_finite(net):
        good = latest_checkpoint(run_dir)
        raise SpectraError(f"step {step}: the weights hold NaN/Inf, so no checkpoint was published; last finite "
                           f"checkpoint: {good or 'none'} (lower --lr or check the data)")
    tmp = ckpt_root / f".tmp_step_{step}"
    if rank == 0:
        fresh_tmp(ckpt_root, step)
    dist_utils.barrier()
    model_sd, optim_sd = get_state_dict(net.lm, opt)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp / DCP_DIR)
    export_pretrained(net.lm, tmp, rank)
    if rank == 0:
        publish(ckpt_root, tmp, step, state, keep, tokenizer)
    dist_utils.barrier()


def load(ckpt, net, opt) -> None:
    """Model and optimizer of a sharded checkpoint into `net` / `opt`, each rank reading only its own shards."""
    if not (ckpt / DCP_DIR / ".metadata").is_file():
        raise SpectraError(f"{ckpt} has no sharded (dcp/) state: it was written by --strategy ddp; resume it with "
                           "--strategy ddp")
    model_sd, optim_sd = get_state_dict(net.lm, opt)
    dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=ckpt / DCP_DIR)
    set_state_dict(net.lm, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)


def export_pretrained(model, folder, rank: int, max_shard_bytes: int = EXPORT_SHARD_BYTES) -> None:
    """`model.save_pretrained(folder)` for a sharded model: config, generation config and safetensors
    weights (HF's names, one file or numbered shards plus index), each tensor gathered on its own and only
    rank 0 keeping it, until a shard of at most `max_shard_bytes` is written. Every rank calls this."""
    sd = model.state_dict()
    groups, size = [[]], 0
    for name, t in sd.items():  # the split is computed from the shapes alone, alike on every rank
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    files = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map = {}
    for fname, names in zip(files, groups):
        part = {}
        for name in names:
            t = dist_utils.full(sd[name].detach())
            if rank == 0:
                part[name] = t.cpu().contiguous().clone()
            del t
        if rank == 0:
            save_file(part, str(folder / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        del part
    if rank == 0:
        hf_logging.disable_progress_bar()
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(folder)
        if len(files) > 1:
            total = sum(t.numel() * t.element_size() for t in sd.values())
            (folder / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def memory_report(net, opt, device) -> dict:
    """This rank's parameter, gradient and optimizer-state bytes as held (shards under FSDP2), and its peak
    resident memory (and peak CUDA allocation on a GPU)."""
    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = list(net.parameters())
    rep = {"param_bytes": sum(local(p) for p in params),
           "optimizer_bytes": sum(local(v) for s in opt.state.values() for v in s.values()
                                  if isinstance(v, torch.Tensor) and v.ndim > 0),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.type == "cuda":
        rep["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return rep
