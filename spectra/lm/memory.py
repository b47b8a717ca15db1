"""Peak training memory, measured the same way for every finetuning method."""

from __future__ import annotations

import ctypes
import threading

import psutil
import torch
from torch import nn

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


class PeakMemory:
    """Peak training memory. GPU: `torch.cuda.max_memory_allocated` (weights, grads, optimizer
    state, activations). CPU: the model's resident parameter/buffer bytes plus the peak growth of
    the process RSS over the run, sampled every 2 ms from a thread (after `malloc_trim`, so memory
    freed by an earlier run in the same process does not hide this one's growth, and freed
    tensors leave the RSS at once)."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_model_bytes_plus_rss_growth"
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        malloc_trim()
        self._proc = psutil.Process()
        self._base = self._peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        resident = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        self.peak_bytes = resident + self._peak - self._base


def malloc_trim() -> None:
    """Give freed heap back to the OS and serve every allocation >= 128 KiB by mmap from now on.
    glibc otherwise raises its mmap threshold after the first big free (up to 32 MiB), keeping
    later freed tensors in the heap, so RSS would track the allocator's cache, not live tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS growth is then a rougher bound
        pass
