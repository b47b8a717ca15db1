"""Thread settings for every spectra command; imported first by spectra/cli/__init__.py, before torch.

Why: OpenMP (and so torch's CPU kernels) spin-waits between parallel regions by default. On a
shared box that spin steals the cores another process (or spectra's own snapshot writer and data
prefetch threads) needs: one layer-0 HVP took 3,835 ms with the default policy while another
process used the CPU and 128 ms with OMP_WAIT_POLICY=PASSIVE; large matmuls on a quiet box were
unchanged (218 vs 217 GFLOP/s). The policy is read once, when libgomp/libiomp loads, so it must be
in the environment before `import torch`.

Threads = the cores this process may run on (its CPU affinity, which taskset, cgroups' cpusets
and Slurm set), not the machine's count. Both are defaults: a value the user exported wins, and
torchrun's own OMP_NUM_THREADS=1 per rank is kept.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def configure() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OMP_NUM_THREADS", str(available_cores()))


configure()
