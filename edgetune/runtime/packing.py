"""Padding-free and length-grouped batches: which examples share a row, and rows -> graph inputs.

A *row* is a list of example indices laid end to end. Packed, a row holds as many examples as fit
in ``--max-seq-len`` tokens; unpacked, one. ``collate`` turns rows into the training graph's
inputs, each (B, T) int64 with T the longest row of the batch:

  input_ids       the examples' tokens, then pad_id
  attention_mask  segment ids: 1, 2, 3... for the 1st, 2nd, 3rd example of the row, 0 for padding;
                  the graph attends only within a segment (block-diagonal causal mask)
  position_ids    restart at 0 for each example, so rotary positions equal a run of the example alone
  labels          the examples' labels; the first token of every example after the first in a row
                  gets IGNORE_INDEX, so the last token of one example never predicts the next one's first

After the causal shift the packed batch has exactly the label positions the same examples have one
by one, and the graph's loss is the mean over them: packing changes neither the loss nor its
per-token weighting. Only bundles whose training graph takes ``position_ids`` (the manifest's
``inputs``) understand segment ids; older ones train unpacked.

Every plan's order is a pure function of (seed, epoch) and its position is (epoch, batch index),
so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from edgetune.constants import IGNORE_INDEX
from edgetune.runtime.batches import BatchPlan

PACKED, GROUPED, SHUFFLED = "packed", "grouped-by-length", "shuffled"
PACKING_SHAPES = ("instruction", "chat")  # data shapes packed by default (short examples)
MEGABATCH = 50  # length grouping sorts windows of this many batches (as transformers' LengthGroupedSampler)


def supports_packing(manifest) -> bool:
    """Whether the bundle's training graph reads segment ids and per-example positions."""
    return any(i.name == "position_ids" for i in manifest.inputs)


def choose_layout(packing: bool | None, group_by_length: bool, shape: str, manifest, log=print) -> str:
    """``--packing`` (None: on for instruction and chat data, unless grouping by length) -> a layout."""
    wanted = packing if packing is not None else (shape in PACKING_SHAPES and not group_by_length)
    if wanted and not supports_packing(manifest):
        log("this bundle's training graph takes no position_ids (exported before packing), so examples are "
            "not packed; re-export the bundle to pack them")
        wanted = False
    if wanted:
        return PACKED
    return GROUPED if group_by_length else SHUFFLED


def pack_rows(lengths: list[int], order, capacity: int) -> list[list[int]]:
    """Best fit in ``order``: each example goes to the open row with the least room that holds it.

    Rows are returned in the order they were opened. ``rooms[r]`` lists the rows with r free tokens,
    so a placement scans at most ``capacity`` buckets.
    """
    rows: list[list[int]] = []
    free: list[int] = []  # free tokens of each row
    rooms: list[list[int]] = [[] for _ in range(capacity + 1)]
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than a row's {capacity}")
        row = next((rooms[r].pop() for r in range(n, capacity + 1) if rooms[r]), None)
        if row is None:
            row = len(rows)
            rows.append([])
            free.append(capacity)
        rows[row].append(int(i))
        free[row] -= n
        rooms[free[row]].append(row)
    return rows


class PackedPlan:
    """Batches of ``batch_size`` packed rows, in an order fixed by (seed, epoch); the BatchPlan protocol.

    Each epoch shuffles the examples with ``default_rng([seed, epoch])`` and packs them in that
    order, so the rows are recomputed, never saved. The last, partial batch of an epoch is kept.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, capacity: int, shuffle: bool = True):
        if not lengths:
            raise ValueError("PackedPlan needs at least one example")
        self.lengths, self.batch_size, self.seed, self.capacity, self.shuffle = list(lengths), batch_size, seed, capacity, shuffle
        self.epoch, self.index = 0, 0
        self._rows: tuple[int, list[list[int]]] | None = None  # (epoch, rows) of the last epoch packed

    def rows(self, epoch: int) -> list[list[int]]:
        if self._rows is None or self._rows[0] != epoch:
            n = len(self.lengths)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._rows = (epoch, pack_rows(self.lengths, order, self.capacity))
        return self._rows[1]

    def batches_in(self, epoch: int) -> int:
        return -(-len(self.rows(epoch)) // self.batch_size)

    @property
    def batches_per_epoch(self) -> int:
        """Of the first epoch (later epochs pack a different order and may differ by a row or two)."""
        return self.batches_in(0)

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, position: dict) -> None:
        self.epoch, self.index = int(position["epoch"]), int(position["index"])

    def __iter__(self) -> Iterator[tuple[int, int, list[list[int]]]]:
        """Yields (epoch, batch index, rows of example indices) from the current position on, forever."""
        while True:
            rows = self.rows(self.epoch)
            while self.index < self.batches_in(self.epoch):
                i = self.index
                self.index += 1  # position now points past the batch handed out
                yield self.epoch, i, rows[i * self.batch_size:(i + 1) * self.batch_size]
            self.epoch, self.index = self.epoch + 1, 0


class LengthGroupedPlan(BatchPlan):
    """Unpacked batches of examples of similar length, so little of each batch is padding.

    Each epoch's shuffled order is cut into windows of ``MEGABATCH`` batches, each window is sorted
    by length (longest first), and the full batches are then put in a shuffled order (the partial
    batch stays last). All of it follows from (seed, epoch).
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        super().__init__(len(lengths), batch_size, seed, shuffle=True)
        self.lengths = np.asarray(lengths)

    def order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(self.num_examples)
        window = self.batch_size * MEGABATCH
        grouped = np.concatenate([w[np.argsort(-self.lengths[w], kind="stable")]
                                  for w in np.split(perm, range(window, len(perm), window))])
        full = len(grouped) // self.batch_size
        blocks = [grouped[k * self.batch_size:(k + 1) * self.batch_size] for k in rng.permutation(full)]
        return np.concatenate([*blocks, grouped[full * self.batch_size:]])


class RowsOf:
    """A plan of example indices seen as rows of one example each (the BatchPlan protocol)."""

    def __init__(self, plan: BatchPlan):
        self.plan = plan

    batches_per_epoch = property(lambda self: self.plan.batches_per_epoch)
    position = property(lambda self: self.plan.position)

    def restore(self, position: dict) -> None:
        self.plan.restore(position)

    def __iter__(self) -> Iterator[tuple[int, int, list[list[int]]]]:
        for epoch, i, indices in self.plan:
            yield epoch, i, [[x] for x in indices]


def make_plan(layout: str, examples, batch_size: int, seed: int, capacity: int):
    """The batch plan of ``layout``; every plan yields (epoch, batch index, rows of example indices).

    Only packed and grouped plans read lengths (``input_ids``); shuffled ones take any examples (e.g. DPO pairs)."""
    if layout == PACKED:
        return PackedPlan([len(e.input_ids) for e in examples], batch_size, seed, capacity)
    if layout == GROUPED:
        return RowsOf(LengthGroupedPlan([len(e.input_ids) for e in examples], batch_size, seed))
    return RowsOf(BatchPlan(len(examples), batch_size, seed))


def collate(examples, rows: list[list[int]], pad_id: int) -> dict[str, np.ndarray]:
    """Rows of example indices -> input_ids, attention_mask (segment ids), position_ids, labels, each (B, T)."""
    width = max(sum(len(examples[i].input_ids) for i in row) for row in rows)
    shape = (len(rows), width)
    ids = np.full(shape, pad_id, dtype=np.int64)
    segments = np.zeros(shape, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for segment, i in enumerate(row, start=1):
            e = examples[i]
            n = len(e.input_ids)
            ids[r, at:at + n], labels[r, at:at + n] = e.input_ids, e.labels
            segments[r, at:at + n], positions[r, at:at + n] = segment, np.arange(n)
            if segment > 1:  # the previous example's last token must not predict this one's first
                labels[r, at] = IGNORE_INDEX
            at += n
    return {"input_ids": ids, "attention_mask": segments, "labels": labels, "position_ids": positions}
