"""When the forward/backward runs under bf16 autocast: one rule for pretraining, finetuning and eval.

Master weights stay fp32 everywhere (never pure bf16, whose 8-bit mantissa swallows small updates).
On CUDA autocast is always on; on CPU only when asked (`cpu_bf16=True`) or, with `cpu_bf16=None`, where
the CPU multiplies bf16 natively (AVX512-BF16 or AMX): there it runs the matmuls 2-4x faster with a loss
curve within 3e-4 of fp32 (bench/README.md); elsewhere bf16 is emulated and slower than fp32.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(device: torch.device | str, cpu_bf16: bool | None = False) -> bool:
    """Whether work on `device` runs under bf16 autocast: always on CUDA; on CPU `cpu_bf16`, where None
    means "where the CPU has native bf16"."""
    if torch.device(device).type == "cuda":
        return True
    return native_cpu_bf16() if cpu_bf16 is None else bool(cpu_bf16)


def autocast_for(device: torch.device | str, bf16: bool) -> AbstractContextManager:
    """bf16 autocast on `device` when `bf16`, else nothing (plain fp32); reusable across steps."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
