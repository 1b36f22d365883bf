"""Padding and a resumable, seeded batch order."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from edgetune.constants import IGNORE_INDEX


def pad_batch(examples, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, position_ids, each (B, T) int64."""
    width = max(len(e.input_ids) for e in examples)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n], mask[row, :n], labels[row, :n] = e.input_ids, 1, e.labels
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": default_positions(ids)}


def default_positions(input_ids: np.ndarray) -> np.ndarray:
    """(B, T) positions 0..T-1 in every row: one example per row, as transformers numbers them."""
    return np.broadcast_to(np.arange(input_ids.shape[1], dtype=np.int64), input_ids.shape).copy()


def graph_inputs(batch: dict[str, np.ndarray], names: list[str], dtypes: list | None = None) -> list[np.ndarray]:
    """The arrays a training graph takes, in the manifest's ``inputs`` order, contiguous, of ``dtypes`` (int64 by default).

    A batch without ``position_ids`` (one example per row) gets positions 0..T-1; a graph without
    that input (bundles exported before packing) is simply not fed it.
    """
    def array(name: str, dtype) -> np.ndarray:
        value = batch[name] if name in batch or name != "position_ids" else default_positions(batch["input_ids"])
        return np.ascontiguousarray(value, dtype=dtype)

    return [array(name, dtype) for name, dtype in zip(names, dtypes or [np.int64] * len(names))]


class BatchPlan:
    """Batches of example indices, epoch after epoch, in an order fixed by (seed, epoch).

    The permutation of epoch e comes from ``default_rng([seed, e])``, so no RNG state needs to be
    saved: ``position`` (epoch, batch index) is enough to continue exactly where a run stopped.
    The last, partial batch of an epoch is kept.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool = True):
        if num_examples <= 0:
            raise ValueError("BatchPlan needs at least one example")
        self.num_examples, self.batch_size, self.seed, self.shuffle = num_examples, batch_size, seed, shuffle
        self.epoch, self.index = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.num_examples // self.batch_size)

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, position: dict) -> None:
        self.epoch, self.index = int(position["epoch"]), int(position["index"])

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def __iter__(self) -> Iterator[tuple[int, int, list[int]]]:
        """Yields (epoch, batch index, example indices) from the current position on, forever."""
        while True:
            order = self.order(self.epoch)
            while self.index < self.batches_per_epoch:
                i = self.index
                chunk = order[i * self.batch_size:(i + 1) * self.batch_size]
                self.index += 1  # position now points past the batch handed out
                yield self.epoch, i, [int(x) for x in chunk]
            self.epoch, self.index = self.epoch + 1, 0
