"""FSDP2 sharding of a causal LM for analysis (hessian-gap --strategy fsdp), as torchtitan and torchtune shard a
decoder: `torch.distributed.fsdp.fully_shard` on every decoder layer (one FSDP unit each), then on the model
itself (embeddings, final norm, lm_head). Parameters live sharded on dim 0 over the ranks of the process group
(gloo on CPU, NCCL on GPUs; spectra.distributed.setup); a layer is whole only while it computes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from spectra.errors import SpectraError


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: its longest nn.ModuleList (LLaMA's model.layers, GPT-2's
    transformer.h, OPT's decoder.layers, ...)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise SpectraError(f"{type(model).__name__} has no list of decoder layers to shard with FSDP2")
    return max(lists, key=len)


def shard_model(model: nn.Module, device: torch.device, blocks=None) -> nn.Module:
    """`model` sharded in place by FSDP2 over the initialized process group, its shards moved to `device` (load
    the model on the CPU first: a GPU then only ever holds its shards): each of `blocks` (default: its decoder
    layers) is one FSDP unit, then the root, as torchtitan does. Returns the model (now an FSDPModule)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise SpectraError("FSDP2 sharding needs a process group: launch with torchrun --nproc_per_node N")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in decoder_blocks(model) if blocks is None else blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def held_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds: its shards for a sharded model, every parameter otherwise."""
    total = 0
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total


def model_bytes(model: nn.Module) -> int:
    """Bytes of the whole model's parameters (a DTensor counts whole)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
