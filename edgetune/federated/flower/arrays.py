"""Adapter tensors (PEFT key -> float32 array) <-> Flower ``ArrayRecord``, keyed by PEFT key."""

from __future__ import annotations

import numpy as np


def to_record(tensors: dict[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in tensors.items()})


def from_record(record) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in record.items()}
