"""Tensor codecs for deltas: fp32 (exact), fp16, int8 with one fp32 scale per row.

``encode(name, x, codec)`` returns the payload entries for one tensor; ``decode`` rebuilds a
float32 array. int8 is symmetric per row: a 2-D tensor (rows, cols) gets scale_r ~= max|x_r| / 127, stored as
fp16 rounded up (so |x| <= 127 * scale_r still holds), and q = round(x / scale_r) in [-127, 127];
the error of each value is at most scale_r / 2. fp16 scales matter for LoRA's B (out, r): with
r = 8 values a row, fp32 scales would add 50 % to the payload, fp16 ones add 25 %.
A 1-D tensor is one row.
"""

from __future__ import annotations

import numpy as np

SCALE_SUFFIX = ".__scale__"


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(1, -1) if x.ndim <= 1 else x.reshape(x.shape[0], -1)


def _encode_int8(name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    rows = _rows(x)
    amax = np.abs(rows).max(axis=1)
    scale32 = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)  # all-zero rows: any scale works
    scale = scale32.astype(np.float16)
    low = scale.astype(np.float32) < scale32
    scale[low] = np.nextafter(scale[low], np.float16(np.inf))  # round up: no value falls outside +-127 steps
    q = np.clip(np.rint(rows / scale.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
    return {name: q.reshape(x.shape), name + SCALE_SUFFIX: scale}


def _decode_int8(name: str, entries: dict[str, np.ndarray]) -> np.ndarray:
    q = entries[name]
    scale = entries[name + SCALE_SUFFIX].astype(np.float32)
    return (_rows(q).astype(np.float32) * scale[:, None]).reshape(q.shape)


CODECS = {
    "fp32": (lambda n, x: {n: x.astype(np.float32)}, lambda n, e: e[n].astype(np.float32), 4),
    "fp16": (lambda n, x: {n: x.astype(np.float16)}, lambda n, e: e[n].astype(np.float32), 2),
    "int8": (_encode_int8, _decode_int8, 1),
}


def encode(name: str, x: np.ndarray, codec: str) -> dict[str, np.ndarray]:
    return CODECS[codec][0](name, np.asarray(x, dtype=np.float32))


def decode(name: str, entries: dict[str, np.ndarray], codec: str) -> np.ndarray:
    return CODECS[codec][1](name, entries)


def reconstruction_error(original: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """max |x - x'| and ||x - x'|| / ||x|| (0 for an all-zero tensor decoded exactly)."""
    diff = (decoded - original).astype(np.float64)
    norm = float(np.linalg.norm(original))
    return {"max_abs": float(np.abs(diff).max(initial=0.0)),
            "rel_l2": float(np.linalg.norm(diff) / norm) if norm > 0 else float(np.linalg.norm(diff))}
