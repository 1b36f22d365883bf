"""Symmetric per-row int8 weights: the numbers, shared by the export half and the device half.

A weight W (out, in) is stored as int8 q (out, in) and one fp32 scale per output row:
scale = max|W_row| / 127, zero point 0, q in [-127, 127]. The int4 rule (``quantize_blocks``)
works on the transposed weight W^T (in, out), in blocks of ``block_size`` rows along ``in``:
scale = max|block column| / 7, zero point 0, q in [-7, 7]. ``export/quantize.py`` writes graphs
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


INT4_SCHEME = "int4-block{block_size}-symmetric"
INT4_BLOCK_SIZES = (32, 64, 128)


def quantize_blocks(wt: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(in, out) fp32 -> (q int8 values in [-7, 7] (in, out), scale fp32 (ceil(in / block_size), out)).

    Blocks run along axis 0 (``in``), as ONNX ``DequantizeLinear(axis=0, block_size)`` reads them;
    the last block may be short. All-zero blocks get scale 1.
    """
    n_in, n_out = wt.shape
    n_blocks = -(-n_in // block_size)
    padded = np.zeros((n_blocks * block_size, n_out), np.float32)
    padded[:n_in] = wt
    blocks = padded.reshape(n_blocks, block_size, n_out)
    amax = np.abs(blocks).max(axis=1)  # (n_blocks, out)
    scale = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[:, None, :]), -7, 7).astype(np.int8)
    return q.reshape(n_blocks * block_size, n_out)[:n_in], scale


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, block_size: int) -> np.ndarray:
    """(in, out) int values and (ceil(in / block_size), out) scales -> (in, out) fp32."""
    return q.astype(np.float32) * np.repeat(scale, block_size, axis=0)[: q.shape[0]]
