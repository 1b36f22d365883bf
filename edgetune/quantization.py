"""Symmetric per-row int8 weights: the numbers, shared by the export half and the device half.

A weight W (out, in) is stored as int8 q (out, in) and one fp32 scale per output row:
scale = max|W_row| / 127, zero point 0, q in [-127, 127]. ``export/quantize.py`` writes graphs
with it; ``merge.py`` dequantizes, adds the adapter and re-quantizes with the same rule. numpy
only, so the device can import it.
"""

from __future__ import annotations

import numpy as np

INT8_SCHEME = "int8-per-channel-symmetric"


def quantize_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(out, in) fp32 -> (q int8 (out, in), scale fp32 (out,)); all-zero rows get scale 1."""
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(out, in) int8 and (out,) scales -> (out, in) fp32."""
    return q.astype(np.float32) * scale[:, None]
