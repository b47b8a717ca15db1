"""The few DDP pieces the loop needs; every function is a no-op in a single process.

Launch with `torchrun --nproc_per_node N -m spectra.cli pretrain ...` (multi-node: the usual
--nnodes/--rdzv-endpoint flags). NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from spectra.errors import SpectraError


def setup(device: str = "auto") -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SpectraError("--device cuda but no CUDA device is visible")
        dev = torch.device("cuda", local if world > 1 else (torch.device(device).index or 0))
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise SpectraError(f"--device must be auto, cpu or cuda, not {device!r}")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def agree_run_id(cfg) -> str:
    """All ranks use rank 0's run id (the default one contains a timestamp)."""
    run_id = [cfg.run_id or f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if active():
        dist.broadcast_object_list(run_id, src=0)
    return run_id[0]


def wrap(model, device: torch.device, world: int):
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(net):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    return net.no_sync() if hasattr(net, "no_sync") else nullcontext()


def mean(value: float, device: torch.device) -> float:
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def sum_pair(a: float, b: float, device: torch.device) -> tuple[float, float]:
    if not active():
        return a, b
    t = torch.tensor([a, b], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t[0].item(), t[1].item()


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def teardown() -> None:
    if active():
        dist.destroy_process_group()
