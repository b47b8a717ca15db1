"""Documents -> packed fixed-length token rows, with an exact, resumable position.

Local data is shuffled by a seeded permutation per epoch, so the exact data position (epoch, index,
leftover tokens) can be saved and resumed bit-for-bit; the hub stream is read in order (C4 shards are
already shuffled) and resumes through `IterableDataset.state_dict()`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import datasets.distributed
import numpy as np
import torch

from spectra.errors import SpectraError


@dataclass
class PackState:
    """Exact position in a packed stream: everything needed to resume the same token sequence."""

    epoch: int = 0
    index: int = 0  # next document position within this epoch's (rank-strided) order
    buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # read, not yet emitted
    hub_state: dict | None = None

    def copy(self) -> "PackState":
        """Cheap snapshot (the buffer is the only mutable part)."""
        return PackState(self.epoch, self.index, self.buffer.copy(), copy.deepcopy(self.hub_state))


class PackedStream:
    """Documents -> tokens + EOS -> concatenated -> fixed `seq_len` rows (no padding waste).

    Local map-style data: epoch e visits documents in `permutation(seed + e)`, rank r of w takes
    every w-th one. Hub streams: in order, split by node. Tokenizes `tok_batch` docs at a time.
    """

    def __init__(self, docs, tokenizer, seq_len: int, *, seed: int = 0, indices=None, rank: int = 0,
                 world: int = 1, tok_batch: int = 64, loop: bool = True, state: PackState | None = None):
        self.docs, self.tok, self.seq_len = docs, tokenizer, seq_len
        self.seed, self.rank, self.world, self.tok_batch, self.loop = seed, rank, world, tok_batch, loop
        self.streaming = not hasattr(docs, "__len__")
        self.indices = np.arange(len(docs)) if (indices is None and not self.streaming) else indices
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise SpectraError("tokenizer has no EOS token to separate packed documents")
        self.state = state or PackState()

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.indices)
        perm = np.random.default_rng(self.seed + epoch).permutation(n) if self.seed >= 0 else np.arange(n)
        return self.indices[perm][self.rank :: self.world]

    def _encode(self, texts: list[str]) -> np.ndarray:
        ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        parts = []
        for seq in ids:
            parts.append(np.asarray(seq, dtype=np.int64))
            parts.append(np.array([self.eos], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _extend(self, tokens: np.ndarray) -> None:
        self.state.buffer = np.concatenate([self.state.buffer, tokens])

    def _refill_local(self) -> bool:
        st = self.state
        order = self._order(st.epoch)
        if st.index >= len(order):
            if not self.loop:
                return False
            st.epoch, st.index = st.epoch + 1, 0
            order = self._order(st.epoch)
            if len(order) == 0:
                raise SpectraError(f"rank {self.rank} has no documents (corpus smaller than world size)")
        take = order[st.index : st.index + self.tok_batch]
        st.index += len(take)
        self._extend(self._encode(self.docs[[int(i) for i in take]]["text"]))
        return True

    def _hub_iter(self):
        ds = self.docs
        if self.world > 1:
            ds = datasets.distributed.split_dataset_by_node(ds, rank=self.rank, world_size=self.world)
        if self.state.hub_state is not None:
            ds.load_state_dict(self.state.hub_state)
        self._hub_ds = ds
        return iter(ds)

    def __iter__(self) -> Iterator[torch.Tensor]:
        n = self.seq_len
        hub_it = self._hub_iter() if self.streaming else None
        while True:
            while len(self.state.buffer) < n:
                if hub_it is None:
                    if not self._refill_local():
                        return
                else:
                    texts = []
                    for ex in hub_it:
                        texts.append(ex["text"])
                        if len(texts) == self.tok_batch:
                            break
                    if not texts:
                        return
                    self._extend(self._encode(texts))
                    self.state.hub_state = self._hub_ds.state_dict()
            row, self.state.buffer = self.state.buffer[:n], self.state.buffer[n:]
            yield torch.from_numpy(row.copy())

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """[batch_size, seq_len] LongTensors; the state is exact after each yielded batch."""
        rows = []
        for row in self:
            rows.append(row)
            if len(rows) == batch_size:
                yield torch.stack(rows)
                rows = []
