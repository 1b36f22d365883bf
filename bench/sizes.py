"""Bytes on disk: the bundle, and the adapter delta a device ships, in each codec."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

CODEC_NAMES = ("fp32", "fp16", "int8")


def bundle_bytes(folder: Path) -> dict[str, int]:
    """Size of every file under the bundle folder, and ``total``."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(Path(folder).rglob("*")) if p.is_file()}
    return {"files": files, "total": sum(files.values())}


def delta_bytes(manifest) -> dict:
    """Trainable tensors' payload per codec, and the ``.etd`` file edgetune.delta writes for them.

    ``payload``: values only (4 / 2 / 1 bytes each) plus, for int8, the codec's per-row scales.
    ``file``: a whole delta file (header, tensor names, checksum), when ``edgetune.delta`` is present.
    Sizes do not depend on the values, so seeded random tensors of the manifest's shapes stand in.
    """
    rng = np.random.default_rng(0)
    tensors = {t.peft_key: rng.normal(0.0, 0.01, t.shape).astype(np.float32) for t in manifest.trainable}
    values = sum(math.prod(t.shape) for t in manifest.trainable)
    out = {"tensors": len(tensors), "values": values, "payload": {}, "file": {}}
    try:
        from edgetune.delta import codecs, encode_delta
    except ImportError:
        codecs = encode_delta = None
    for codec in CODEC_NAMES:
        if codecs is not None:
            out["payload"][codec] = sum(a.nbytes for name, x in tensors.items() for a in codecs.encode(name, x, codec).values())
            method = {"name": manifest.method["name"], "config": manifest.method["config"]}
            out["file"][codec] = len(encode_delta(tensors, base_model_sha256=manifest.base_sha256, method=method, codec=codec))
        else:  # no encoder: count values, and for int8 one fp16 scale per row
            rows = sum(t.shape[0] if len(t.shape) > 1 else 1 for t in manifest.trainable)
            out["payload"][codec] = values * {"fp32": 4, "fp16": 2, "int8": 1}[codec] + (2 * rows if codec == "int8" else 0)
            out["file"][codec] = None
    return out
