"""Symmetric per-row int8 weights: the numbers, shared by the export half and the device half.

A weight W (out, in) is stored as int8 q (out, in) and one fp32 scale per output row:
scale = max|W_row| / 127, zero point 0, q in [-127, 127]. The int4 rule (``quantize_blocks``)
works on the transposed weight W^T (in, out), in blocks of ``block_size`` rows along ``in``:
scale = max|block column| / 7, zero point 0, q in [-7, 7]. ``split_nibbles`` stores the int8
values exactly in com.microsoft MatMulNBits' 4-bit layout (generation graphs,
``export/generation_kernels.py``); ``join_nibbles`` reads them back (``merge.py``). ``export/quantize.py`` writes graphs
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


# --- int8 values in MatMulNBits' 4-bit layout (the generation graph) ---------------------------------
NBITS_SUFFIXES = (".nbits", ".nbits_scale", ".nbits_zero_point")  # B, scales, zero points beside the weight's name
NBITS_BLOCK_SIZES = (256, 128, 64, 32, 16)  # what MatMulNBits accepts; the largest that divides ``in`` is used


def block_size_for(k: int) -> int | None:
    """Largest MatMulNBits block size dividing ``k`` (so the hi and lo halves never share a block)."""
    return next((b for b in NBITS_BLOCK_SIZES if k % b == 0), None)


def split_nibbles(q: np.ndarray, scale: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int8 q (N, K) in [-127, 127] and row scales (N,) -> MatMulNBits B, scales, zero points for K' = 2K.

    q = 16 * hi + lo exactly, hi = floor(q / 16) in [-8, 7], lo in [0, 15]; the first K values of
    each row hold hi + 8 (zero point 8, scale 16 s), the last K hold lo (zero point 0, scale s), so
    [x, x] @ B'^T = x @ (s q)^T. Returns B uint8 (N, 2K / bs, bs / 2) (of each byte, the low nibble
    is the even element), scales fp32 (N * 2K / bs,) and zero points uint8 (N * ceil(2K / bs / 2),).
    """
    n, k = q.shape
    q16 = q.astype(np.int16)
    hi = np.floor_divide(q16, 16)
    lo = q16 - 16 * hi
    values = np.concatenate([hi + 8, lo], axis=1).astype(np.uint8)  # (N, 2K) unsigned nibbles
    packed = values[:, 0::2] | (values[:, 1::2] << 4)  # (N, K)
    blocks = k // block_size  # per half
    b = packed.reshape(n, 2 * blocks, block_size // 2)
    scales = np.concatenate([np.repeat(16 * scale[:, None], blocks, 1), np.repeat(scale[:, None], blocks, 1)], axis=1)
    zp = np.concatenate([np.full((n, blocks), 8, np.uint8), np.zeros((n, blocks), np.uint8)], axis=1)
    if zp.shape[1] % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
    zp_packed = zp[:, 0::2] | (zp[:, 1::2] << 4)  # (N, ceil(2 * blocks / 2))
    return b, scales.astype(np.float32).reshape(-1), zp_packed.reshape(-1)


def join_nibbles(b: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``split_nibbles``' B (N, 2K / bs, bs / 2) and scales -> int8 q (N, K) and row scales (N,)."""
    n = b.shape[0]
    values = np.empty((n, b.shape[1] * b.shape[2] * 2), np.int16)
    flat = b.reshape(n, -1)
    values[:, 0::2], values[:, 1::2] = flat & 0x0F, flat >> 4
    k = values.shape[1] // 2
    q = 16 * (values[:, :k] - 8) + values[:, k:]
    scale = scales.reshape(n, -1)[:, -1]  # a lo block's scale is the row scale itself
    return q.astype(np.int8), scale.astype(np.float32)


NBITS4_SUFFIXES = (".nbits4", ".nbits4_scale")  # int4 blocks as MatMulNBits B and scales (zero point 8, its default)


def blocks_to_nbits(q: np.ndarray, scale: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_blocks``' q (in, out) in [-7, 7] and scales (n_blocks, out) -> MatMulNBits B (out, n_blocks,
    block_size / 2) (value + 8, the low nibble first; the padding of a short last block reads as 0) and
    scales (out * n_blocks,)."""
    n_in, n_out = q.shape
    n_blocks = scale.shape[0]
    values = np.full((n_out, n_blocks * block_size), 8, np.uint8)
    values[:, :n_in] = (q.T.astype(np.int16) + 8).astype(np.uint8)
    packed = values[:, 0::2] | (values[:, 1::2] << 4)
    return packed.reshape(n_out, n_blocks, block_size // 2), np.ascontiguousarray(scale.T, np.float32).reshape(-1)


def nbits_to_blocks(b: np.ndarray, scales: np.ndarray, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """``blocks_to_nbits``' B and scales -> q (in, out) int8 in [-7, 7] and scales (n_blocks, out)."""
    n_out, n_blocks = b.shape[:2]
    flat = b.reshape(n_out, -1)
    values = np.empty((n_out, flat.shape[1] * 2), np.int16)
    values[:, 0::2], values[:, 1::2] = flat & 0x0F, flat >> 4
    q = (values[:, :n_in] - 8).T.astype(np.int8)
    return np.ascontiguousarray(q), np.ascontiguousarray(scales.reshape(n_out, n_blocks).T)
