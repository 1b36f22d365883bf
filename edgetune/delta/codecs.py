"""Tensor codecs for deltas: fp32 (exact), fp16, int8 with one scale per row.

``encode(name, x, codec)`` returns the payload entries of one tensor (safetensors key -> array);
``decode(name, entries, codec)`` rebuilds a float32 array of the same shape. Stated error bounds
(what ``tests/test_delta_format.py`` checks):

* ``fp32``: bit-exact.
* ``fp16``: every value within 2^-11 of itself, relatively (float16 round-to-nearest), for values
  in float16's normal range (|x| >= 2^-14); below that, within 2^-25 absolutely. |x| > 65504 is
  refused when encoding.
* ``int8``: symmetric per row. A tensor of shape (rows, *rest) is viewed as (rows, prod(rest));
  a 1-D or 0-D tensor is one row. scale_r = max|x_r| / 127 (1 for an all-zero row),
  q = round(x / scale_r) clipped to [-127, 127], so every value is within scale_r / 2 of itself.

int8 scales are stored as float16, rounded up (so |x| <= 127 * scale_r still holds), whenever
that costs at most 1/64 of the resolution on every row; otherwise the tensor keeps float32
scales. fp16 scales matter for LoRA's B (out, r): with r = 8 values a row, float32 scales add 50 %
to the int8 payload, float16 ones 25 %. The fallback covers rows so small that float16 would
round their scale up a lot (max|x_r| below ~5e-4, e.g. a diff after a tiny step) or so large it
would overflow (max|x_r| > 8.3e6). Readers accept either scale dtype.

New codecs slot in with ``register(Codec(...))``; the header records each tensor's codec name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgetune.errors import DeltaError

SCALE_SUFFIX = ".__scale__"
FP16_MAX = 65504.0
_SCALE_SLACK = 1.0 + 1.0 / 64  # largest accepted stored/ideal ratio of an fp16 scale


@dataclass(frozen=True)
class Codec:
    """One way to store a float32 tensor. ``encode(name, x)`` gets a finite float32 array."""

    name: str
    encode: Callable[[str, np.ndarray], dict[str, np.ndarray]]
    decode: Callable[[str, dict[str, np.ndarray]], np.ndarray]
    payload_keys: Callable[[str], tuple[str, ...]]  # the safetensors keys one tensor owns
    bound: str  # the stated error bound, in words (docs, `delta inspect`)


CODECS: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    CODECS[codec.name] = codec
    return codec


def get(codec: str) -> Codec:
    try:
        return CODECS[codec]
    except (KeyError, TypeError):
        raise DeltaError(f"unknown codec {codec!r}; choose one of: {', '.join(CODECS)}.") from None


def _rows(x: np.ndarray) -> np.ndarray:
    """(rows, cols) view: first axis = rows, the rest flattened; 0-D and 1-D tensors are one row."""
    if x.ndim <= 1:
        return x.reshape(1, x.size)
    return x.reshape(x.shape[0], int(np.prod(x.shape[1:])))


def _entry(name: str, entries: dict, key: str, dtypes: tuple) -> np.ndarray:
    if key not in entries:
        raise DeltaError(f"{name}: payload entry {key!r} is missing")
    a = entries[key]
    if a.dtype not in dtypes:
        raise DeltaError(f"{name}: payload entry {key!r} has dtype {a.dtype}, expected {' or '.join(map(str, dtypes))}")
    return a


# --- fp32 / fp16: plain casts -------------------------------------------------------------------

def _encode_fp32(name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    return {name: x}


def _encode_fp16(name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    amax = float(np.abs(x).max(initial=0.0))
    if amax > FP16_MAX:
        raise DeltaError(f"{name}: values up to {amax:.3g} do not fit float16 (largest 65504); "
                         "use codec int8 or fp32.")
    return {name: x.astype(np.float16)}


def _plain_decoder(dtype):
    def decode(name: str, entries: dict[str, np.ndarray]) -> np.ndarray:
        return _entry(name, entries, name, (np.dtype(dtype),)).astype(np.float32)

    return decode


# --- int8: symmetric, one scale per row ---------------------------------------------------------

def _encode_int8(name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    rows = _rows(x)  # (R, C)
    amax = np.abs(rows).max(axis=1, initial=0.0)  # (R,)
    tiny = np.finfo(np.float32).smallest_subnormal  # amax / 127 must not underflow to 0
    ideal = np.where(amax > 0, np.maximum(amax / np.float32(127.0), tiny), 1.0).astype(np.float32)  # zero row: any
    with np.errstate(over="ignore"):
        half = ideal.astype(np.float16)
    low = half.astype(np.float32) < ideal
    half[low] = np.nextafter(half[low], np.float16(np.inf))  # round up: no value falls beyond 127 steps
    stored = half.astype(np.float32)
    compact = bool(np.all(np.isfinite(stored)) and np.all(stored <= ideal * _SCALE_SLACK))
    scale = half if compact else ideal
    q = np.clip(np.rint(rows / scale.astype(np.float32)[:, None]), -127, 127).astype(np.int8)  # (R, C)
    return {name: q.reshape(x.shape), name + SCALE_SUFFIX: scale}


def _decode_int8(name: str, entries: dict[str, np.ndarray]) -> np.ndarray:
    q = _entry(name, entries, name, (np.dtype(np.int8),))
    scale = _entry(name, entries, name + SCALE_SUFFIX, (np.dtype(np.float16), np.dtype(np.float32)))
    rows = _rows(q)
    if scale.shape != (rows.shape[0],):
        raise DeltaError(f"{name}: {scale.shape[0] if scale.ndim == 1 else scale.shape} scales for "
                         f"{rows.shape[0]} rows")
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise DeltaError(f"{name}: its int8 scales must be finite and positive")
    if q.size and int(q.min()) < -127:  # the symmetric range: -128 has no positive twin
        raise DeltaError(f"{name}: int8 value {int(q.min())} is outside the symmetric range [-127, 127]")
    return (rows.astype(np.float32) * scale.astype(np.float32)[:, None]).reshape(q.shape)


register(Codec("fp32", _encode_fp32, _plain_decoder(np.float32), lambda n: (n,), "bit-exact"))
register(Codec("fp16", _encode_fp16, _plain_decoder(np.float16), lambda n: (n,),
               "relative 2^-11 per value (absolute 2^-25 below 2^-14)"))
register(Codec("int8", _encode_int8, _decode_int8, lambda n: (n, n + SCALE_SUFFIX),
               "half a step per value: scale_r / 2, scale_r ~= max|row| / 127"))


def encode(name: str, array: np.ndarray, codec: str) -> dict[str, np.ndarray]:
    """Payload entries for one tensor; refuses unknown codecs, non-numbers and NaN/Inf."""
    c = get(codec)
    a = np.asarray(array)
    if a.dtype.kind not in "biuf":
        raise DeltaError(f"{name}: dtype {a.dtype} is not a real number type; give float32 values.")
    with np.errstate(over="ignore"):
        x = np.asarray(a, dtype=np.float32)
    x = x if x.flags.c_contiguous else x.copy(order="C")  # (not ascontiguousarray: it makes 0-D arrays 1-D)
    if not np.isfinite(x).all():
        raise DeltaError(f"{name}: NaN or Inf values (or beyond float32's range); refusing to encode it.")
    return c.encode(name, x)


def decode(name: str, entries: dict[str, np.ndarray], codec: str) -> np.ndarray:
    """float32 array of tensor ``name`` from the payload ``entries``; DeltaError if they do not fit."""
    return get(codec).decode(name, entries)


def encode_tensors(tensors: dict, codec: str, problems: list[str]) -> tuple[dict[str, np.ndarray], list[dict]]:
    """(payload entries, the header's tensor list sorted by name) for every tensor; appends problems."""
    if not isinstance(tensors, dict):
        problems.append(f"`tensors` must be a dict name -> array, got {type(tensors).__name__}")
        return {}, []
    payload, listing, owner = {}, [], {}
    for name in sorted(tensors, key=str):
        if not isinstance(name, str) or not name:
            problems.append(f"tensor names must be non-empty strings, got {name!r}")
            continue
        try:
            entries = encode(name, tensors[name], codec)
        except DeltaError as exc:
            problems.append(str(exc).rstrip("."))
            continue
        for key in sorted(set(entries) & set(owner)):  # e.g. tensors "w" and "w.__scale__" under int8
            problems.append(f"payload key {key!r} of tensor {name} is also used by tensor {owner[key]}; rename one")
        owner.update(dict.fromkeys(entries, name))
        payload.update(entries)
        original = np.asarray(tensors[name], dtype=np.float32)
        listing.append({"name": name, "shape": list(original.shape), "dtype": "float32", "codec": codec,
                        "payload_keys": sorted(entries),
                        "error": reconstruction_error(original, decode(name, entries, codec))})
    return payload, listing


def decode_tensors(listing: list[dict], entries: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """(name -> float32 array, problems) for a header's tensor list; also flags unlisted entries."""
    tensors, problems = {}, []
    for info in listing:
        try:
            x = decode(info["name"], entries, info["codec"])
        except DeltaError as exc:
            problems.append(str(exc).rstrip("."))
            continue
        if list(x.shape) != info["shape"]:
            problems.append(f"{info['name']}: payload shape {list(x.shape)} != header shape {info['shape']}")
        tensors[info["name"]] = x
    unlisted = set(entries) - {k for info in listing for k in info["payload_keys"]}
    if unlisted:
        names = sorted(unlisted)
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        problems.append(f"payload entries not in the header: {', '.join(names[:5])}{more}")
    return tensors, problems


def reconstruction_error(original: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """``max_abs`` = max |x - x'|; ``rel_l2`` = ||x - x'|| / ||x|| (||x - x'|| for an all-zero x)."""
    d = np.asarray(decoded, dtype=np.float64) - np.asarray(original, dtype=np.float64)
    norm = float(np.linalg.norm(np.asarray(original, dtype=np.float64)))
    err = float(np.linalg.norm(d))
    return {"max_abs": float(np.abs(d).max(initial=0.0)), "rel_l2": err / norm if norm > 0 else err}
