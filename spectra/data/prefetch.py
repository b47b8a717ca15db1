"""Batches built on a background thread, with the stream position kept exact for resume."""

from __future__ import annotations

import queue
import threading
import time

import torch

from spectra.data.packing import PackedStream, PackState


class Prefetcher:
    """Builds batches on a background thread (the Rust tokenizer releases the GIL, so tokenizing
    overlaps the GPU step) while keeping resume exact: each batch travels with a copy of the
    stream state *after* it, and `state` is the state after the last batch handed out."""

    def __init__(self, stream: PackedStream, batch_size: int, depth: int = 4):
        self.stream, self.batch_size = stream, batch_size
        self._state = stream.state.copy()
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            for batch in self.stream.batches(self.batch_size):
                item = (batch.pin_memory() if torch.cuda.is_available() else batch, self.stream.state.copy())
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:  # check for stop, then retry
                        continue
                if self._stop.is_set():
                    return
            self._q.put(StopIteration())
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._q.put(e)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        item = self._q.get()
        if isinstance(item, BaseException):
            self._stop.set()
            raise item
        batch, self._state = item
        return batch

    @property
    def state(self) -> PackState:
        return self._state.copy()

    def close(self, timeout: float = 60.0) -> None:
        """Stop the producer and wait until it has left native code. A daemon thread still inside
        the tokenizer or torch at interpreter exit is killed by pthread_exit mid-C++ frame, which
        aborts the process ("terminate called without an active exception") after a good run."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:  # make room so a producer blocked on put() sees the stop flag
                self._q.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
