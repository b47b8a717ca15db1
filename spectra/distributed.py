"""The few torch.distributed pieces the commands need (DDP pretraining, components split over
ranks in hessian-gap); every function is a no-op in a single process.

Launch with `torchrun --nproc_per_node N -m spectra.cli pretrain|hessian-gap ...` (multi-node: the usual
--nnodes/--rdzv-endpoint flags). NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from spectra.models.parts import resolve_device


def setup(device: str = "auto", group: bool = False) -> tuple[int, int, torch.device]:
    """(rank, world, device): under torchrun one process group (NCCL on GPUs, gloo on CPU) and
    one GPU per local rank; in a single process (0, 1, the resolved --device), with a one-rank group
    when `group` (FSDP2 shards over a device mesh, which needs one even for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if world > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        elif dev.index is None:
            dev = torch.device("cuda", 0)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    elif group and not dist.is_initialized():  # an in-process store: no port, no rendezvous
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    return rank, world, dev


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def agree_run_id(cfg) -> str:
    """All ranks use rank 0's run id (the default one contains a timestamp)."""
    run_id = [cfg.run_id if cfg.run_id is not None else f"{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if active():
        dist.broadcast_object_list(run_id, src=0)
    return run_id[0]


def broadcast(obj):
    """Rank 0's `obj` on every rank (a small picklable value; identity in a single process)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model, device: torch.device, world: int):
    if world == 1:
        return model
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def grad_sync(net, sync: bool):
    """Context for one micro-batch's forward and backward: with `sync` False the gradient all-reduce (DDP)
    or reduce-scatter (FSDP2) is skipped and the micro-batch gradients are summed locally, to be reduced
    once with the last micro-batch of the accumulation (`sync` True)."""
    if isinstance(net, FSDPModule):  # FSDP2 reads the flag after backward, so it is set, not scoped
        net.set_requires_gradient_sync(sync)
        return nullcontext()
    return net.no_sync() if not sync and hasattr(net, "no_sync") else nullcontext()


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (an FSDP2 shard) is all-gathered, a collective every rank must join;
    any other tensor is returned as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


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


@contextmanager
def rank0_first():
    """Run the body on rank 0 before the other ranks (shared on-disk caches are written once)."""
    rank = dist.get_rank() if active() else 0
    if rank != 0:
        dist.barrier()
    yield
    if rank == 0:
        barrier()


def teardown() -> None:
    """Destroy the group once every rank got here: a rank that tears down (or exits) while rank 0
    still writes its last checkpoint can leave gloo work in flight, which aborts at interpreter exit."""
    if active():
        dist.barrier()
        dist.destroy_process_group()
