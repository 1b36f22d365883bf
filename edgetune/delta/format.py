"""The ``.etd`` delta container (format version 1; documented in docs/delta-format.md).

    magic      8 bytes   b"ETDELTA\\0"
    version    u32 LE    1
    header     u64 LE length + UTF-8 JSON (sorted keys)
    payload    u64 LE length + safetensors bytes (the encoded tensors)
    checksum   32 bytes  SHA-256 of everything above
    signature  optional: u16 LE length (96) + 32-byte Ed25519 public key + 64-byte signature of the checksum

Writing is atomic (temp file in the same folder, fsync, rename): a killed process or a full disk
never leaves a half file under the final name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgetune.delta import codecs, signing
from edgetune.errors import DeltaError

MAGIC = b"ETDELTA\0"
FORMAT_VERSION = 1
KINDS = ("full", "diff")


@dataclass
class Delta:
    header: dict
    tensors: dict[str, np.ndarray]  # decoded float32, by PEFT key
    sha256: str
    signer_fingerprint: str | None = None
    signature_status: str = "unsigned"  # unsigned | valid | valid, trusted key
    size: int = 0
    payload_sizes: dict[str, int] = field(default_factory=dict)

    def __getattr__(self, name):  # header fields as attributes: delta.kind, delta.codec, ...
        header = self.__dict__.get("header", {})
        if name in header:
            return header[name]
        raise AttributeError(name)


def encode_delta(tensors: dict[str, np.ndarray], *, base_model_sha256: str, method: dict, codec: str = "fp16",
                 kind: str = "full", since_sha256: str | None = None, num_examples: int = 0,
                 round_id: str | None = None, metrics: dict | None = None, signing_key=None,
                 producer: dict | None = None) -> bytes:
    from safetensors.numpy import save

    if codec not in codecs.CODECS:
        raise DeltaError(f"unknown codec {codec!r}; choose one of: {', '.join(codecs.CODECS)}.")
    if kind not in KINDS:
        raise DeltaError(f"unknown delta kind {kind!r}; choose one of: {', '.join(KINDS)}.")
    _refuse_non_finite(tensors, "the adapter to ship")
    payload, listing = {}, []
    for name in sorted(tensors):
        x = np.asarray(tensors[name], dtype=np.float32)
        entries = codecs.encode(name, x, codec)
        payload.update(entries)
        listing.append({"name": name, "shape": list(x.shape), "dtype": "float32", "codec": codec,
                        "payload_keys": sorted(entries),
                        "error": codecs.reconstruction_error(x, codecs.decode(name, entries, codec))})
    header = {
        "format_version": FORMAT_VERSION, "base_model_sha256": base_model_sha256, "method": method,
        "kind": kind, "since_sha256": since_sha256, "codec": codec, "tensors": listing,
        "num_examples": int(num_examples), "round_id": round_id, "metrics": dict(metrics or {}),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "producer": dict(producer or {}),
    }
    head = json.dumps(header, sort_keys=True).encode()
    body = save(payload) if payload else b""
    blob = MAGIC + struct.pack("<I", FORMAT_VERSION) + struct.pack("<Q", len(head)) + head + struct.pack("<Q", len(body)) + body
    digest = hashlib.sha256(blob).digest()
    out = blob + digest
    if signing_key is not None:
        public, signature = signing.sign(digest, signing_key)
        out += struct.pack("<H", len(public) + len(signature)) + public + signature
    return out


def write_delta(path: Path, tensors: dict[str, np.ndarray], **kwargs) -> int:
    """Encode and write atomically; returns the file size."""
    data = encode_delta(tensors, **kwargs)
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent or ".")
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would surprise whoever collects the file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        if exc.errno == errno.ENOSPC:
            raise DeltaError(f"the disk is full while writing {path}; nothing was written. Free space and run again.") from None
        raise
    return len(data)


def read_delta(source: Path | bytes, *, trusted_keys: dict | None = None, require_signature: bool = False) -> Delta:
    """Parse, verify (checksum, signature) and decode a delta. Every refusal is a DeltaError."""
    from safetensors.numpy import load

    where = "delta" if isinstance(source, (bytes, bytearray)) else str(source)
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise DeltaError(f"{where}: cannot read ({exc.strerror}); give a delta file from `edgetune delta`.") from None
    if not data.startswith(MAGIC):
        raise DeltaError(f"{where}: not an edgetune delta (bad magic bytes).")
    try:
        (version,) = struct.unpack_from("<I", data, 8)
        if version != FORMAT_VERSION:
            raise DeltaError(f"{where}: delta format version {version} is not supported (this edgetune reads {FORMAT_VERSION}); upgrade edgetune.")
        (head_len,) = struct.unpack_from("<Q", data, 12)
        head_end = 20 + head_len
        (body_len,) = struct.unpack_from("<Q", data, head_end)
        body_end = head_end + 8 + body_len
        digest = data[body_end:body_end + 32]
        if len(digest) != 32:
            raise struct.error("short")
    except struct.error:
        raise DeltaError(f"{where}: the file is truncated; copy it again.") from None
    if hashlib.sha256(data[:body_end]).digest() != digest:
        raise DeltaError(f"{where}: checksum mismatch: the file is corrupt or was modified; copy it again.")
    fingerprint, status = _check_signature(where, digest, data[body_end + 32:], trusted_keys, require_signature)
    header = json.loads(data[20:head_end])
    entries = load(data[head_end + 8:body_end]) if body_len else {}
    tensors, problems = {}, []
    for t in header["tensors"]:
        try:
            x = codecs.decode(t["name"], entries, t["codec"])
        except KeyError:
            problems.append(f"{t['name']}: payload missing")
            continue
        if list(x.shape) != t["shape"]:
            problems.append(f"{t['name']}: payload shape {list(x.shape)} != header shape {t['shape']}")
        tensors[t["name"]] = x
    if problems:
        raise DeltaError(f"{where}: inconsistent delta: {'; '.join(problems)}.")
    _refuse_non_finite(tensors, where)
    sizes = {t["name"]: sum(int(entries[k].nbytes) for k in t["payload_keys"]) for t in header["tensors"]}
    return Delta(header, tensors, digest.hex(), fingerprint, status, len(data), sizes)


def _check_signature(where, digest, block, trusted_keys, require_signature):
    if not block:
        if require_signature:
            raise DeltaError(f"{where}: the delta is not signed, but a signature by a trusted key is required.")
        return None, "unsigned"
    try:
        (n,) = struct.unpack_from("<H", block, 0)
        public, signature = block[2:34], block[34:2 + n]
        if n != 96 or len(block) != 2 + n:
            raise struct.error("size")
    except struct.error:
        raise DeltaError(f"{where}: the signature block is malformed or truncated.") from None
    fingerprint = signing.fingerprint_raw(public)
    if not signing.verify(digest, public, signature):
        raise DeltaError(f"{where}: bad signature (key {fingerprint}); the delta was modified or forged.")
    if trusted_keys is not None:
        if fingerprint not in trusted_keys:
            raise DeltaError(f"{where}: signed by unknown key {fingerprint}; it is not among the trusted keys "
                             f"({', '.join(sorted(trusted_keys)) or 'none'}).")
        return fingerprint, "valid, trusted key"
    return fingerprint, "valid"


def _refuse_non_finite(tensors: dict, where: str) -> None:
    bad = sorted(n for n, x in tensors.items() if not np.isfinite(x).all())
    if bad:
        raise DeltaError(f"{where}: NaN or Inf values in {', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}; refusing it.")
