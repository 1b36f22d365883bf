"""The ``.etd`` delta container, format version 1 (the full description: docs/delta-format.md).

    magic      8 bytes   b"ETDELTA\\0"
    version    u32 LE    1
    header     u64 LE length n + n bytes of UTF-8 JSON (sorted keys)
    payload    u64 LE length m + m bytes of safetensors (the encoded tensors; empty when m = 0)
    checksum   32 bytes  SHA-256 of every byte above
    signature  optional: u16 LE length (96) + 32-byte raw Ed25519 public key + 64-byte signature of the checksum

A reader checks the framing, then the checksum, then the signature, and only then parses the
header (against the full schema in ``schema.py``) and payload; it decodes every tensor and
refuses NaN/Inf. Writing is atomic (temp file in
the same folder, fsync, os.replace): a killed process or a full disk never leaves a half file
under the final name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import operator
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgetune.atomic import atomic_write_bytes
from edgetune.delta import codecs, schema, signing
from edgetune.errors import DeltaError

MAGIC = b"ETDELTA\0"
FORMAT_VERSION = 1
KINDS = schema.KINDS


def _header_field(key: str) -> property:
    return property(lambda self: self.header[key], doc=f"The header's ``{key}``.")


@dataclass
class Delta:
    """A verified, decoded delta. Header fields are read-only attributes (``delta.kind``, ...).

    ``signature_status``: "unsigned"; "valid" (the signature verifies, no trusted keys were
    given); "valid, trusted key" (it verifies and its key is among the trusted ones).
    """

    header: dict
    tensors: dict[str, np.ndarray]  # name (PEFT key) -> decoded float32 array of the header's shape
    sha256: str  # hex checksum of the file (what a diff's since_sha256 names)
    signer_fingerprint: str | None = None
    signature_status: str = "unsigned"
    size: int = 0  # bytes of the whole file
    payload_sizes: dict[str, int] = field(default_factory=dict)  # name -> encoded bytes

    format_version = _header_field("format_version")
    base_model_sha256 = _header_field("base_model_sha256")
    method = _header_field("method")
    kind = _header_field("kind")
    since_sha256 = _header_field("since_sha256")
    codec = _header_field("codec")
    tensor_info = _header_field("tensors")  # [{name, shape, dtype, codec, payload_keys, error}]
    num_examples = _header_field("num_examples")
    round_id = _header_field("round_id")
    metrics = _header_field("metrics")
    created_at = _header_field("created_at")
    producer = _header_field("producer")


def encode_delta(tensors: dict[str, np.ndarray], *, base_model_sha256: str, method: dict, codec: str = "fp16",
                 kind: str = "full", since_sha256: str | None = None, num_examples: int = 0,
                 round_id: str | None = None, metrics: dict | None = None, signing_key=None,
                 producer: dict | None = None) -> bytes:
    """The bytes of a delta file. Every problem with the arguments is reported in one DeltaError."""
    from safetensors.numpy import save

    from edgetune import __version__

    problems = _argument_problems(base_model_sha256, method, codec, kind, since_sha256, round_id)
    num_examples, metrics = _numbers(num_examples, metrics, problems)
    if producer is not None and not isinstance(producer, dict):
        problems.append(f"`producer` must be a dict, got {type(producer).__name__}")
    payload, listing = codecs.encode_tensors(tensors, codec, problems) if codec in codecs.CODECS else ({}, [])
    if problems:
        raise DeltaError("cannot write the delta: " + "; ".join(problems) + ".")
    header = {
        "format_version": FORMAT_VERSION, "base_model_sha256": base_model_sha256, "method": method,
        "kind": kind, "since_sha256": since_sha256, "codec": codec, "tensors": listing,
        "num_examples": num_examples, "round_id": round_id, "metrics": metrics,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "producer": {"edgetune": __version__, **(producer or {})},
    }
    try:
        head = json.dumps(header, sort_keys=True, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise DeltaError(f"cannot write the delta: `method` or `producer` is not plain JSON ({exc}).") from None
    problems = schema.header_problems(json.loads(head), FORMAT_VERSION)  # never write what a reader refuses
    if problems:
        raise DeltaError("cannot write the delta: " + "; ".join(problems) + ".")
    body = save(payload) if payload else b""
    blob = b"".join([MAGIC, struct.pack("<IQ", FORMAT_VERSION, len(head)), head, struct.pack("<Q", len(body)), body])
    digest = hashlib.sha256(blob).digest()
    if signing_key is None:
        return blob + digest
    public, signature = signing.sign(digest, signing_key)
    return blob + digest + struct.pack("<H", len(public) + len(signature)) + public + signature


def _argument_problems(base, method, codec, kind, since, round_id) -> list[str]:
    problems = []
    if not (isinstance(base, str) and schema.HEX64.fullmatch(base)):
        problems.append(f"`base_model_sha256` must be 64 lowercase hex digits, got {base!r}")
    if not (isinstance(method, dict) and isinstance(method.get("name"), str) and isinstance(method.get("config"), dict)):
        problems.append(f"`method` must be {{'name': str, 'config': dict}}, got {method!r}")
    if codec not in codecs.CODECS:
        problems.append(f"unknown codec {codec!r} (choose one of: {', '.join(codecs.CODECS)})")
    if kind not in KINDS:
        problems.append(f"unknown kind {kind!r} (choose one of: {', '.join(KINDS)})")
    elif kind == "diff" and not (isinstance(since, str) and schema.HEX64.fullmatch(since)):
        problems.append(f"a diff needs `since_sha256`, the checksum of the delta it is relative to, got {since!r}")
    elif kind == "full" and since is not None:
        problems.append("`since_sha256` is only for kind 'diff'; a full delta has none")
    if round_id is not None and not isinstance(round_id, str):
        problems.append(f"`round_id` must be a string or None, got {round_id!r}")
    return problems


def _numbers(num_examples, metrics, problems: list[str]) -> tuple[int, dict[str, float]]:
    """num_examples as an int >= 0 and metrics as {str: finite float}; appends problems."""
    try:
        n = -1 if isinstance(num_examples, bool) else operator.index(num_examples)  # numpy ints too, not 3.0
    except TypeError:
        n = -1
    if not schema.count(n):
        problems.append(f"`num_examples` must be a whole number >= 0, got {num_examples!r} (at most 2^63 - 1)")
    if not isinstance(metrics or {}, dict):
        problems.append(f"`metrics` must be a dict of numbers, got {type(metrics).__name__}")
        return n, {}
    out = {}
    for key, value in (metrics or {}).items():
        try:
            out[str(key)] = math.nan if isinstance(value, bool) else float(value)  # True is not a loss
        except (TypeError, ValueError, OverflowError):
            out[str(key)] = math.nan
        if not math.isfinite(out[str(key)]):
            problems.append(f"metric {key!r} must be a finite number, got {value!r}")
    return n, out


def write_delta(path: Path | str, tensors: dict[str, np.ndarray], **kwargs) -> int:
    """Encode (``kwargs`` as for ``encode_delta``) and write atomically; returns the file size.

    On any OSError the final path is untouched (an older file there stays as it was) and the temp
    file is removed; the DeltaError says why and that nothing was written.
    """
    data = encode_delta(tensors, **kwargs)  # refuse bad input before touching the disk
    path = Path(path)
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise DeltaError(_write_failure(path, exc)) from None
    return len(data)


def _write_failure(path: Path, exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"the disk is full: cannot write {path}; nothing was written. Free some space and run again."
    if exc.errno == errno.ENOENT and not path.parent.is_dir():
        return f"cannot write {path}: folder {path.parent} does not exist; nothing was written. Create it first."
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: {exc.strerror}; nothing was written. Choose a writable folder."
    return f"cannot write {path}: {exc.strerror or exc}; nothing was written."


def read_delta(source: Path | str | bytes, *, trusted_keys: dict | None = None,
               require_signature: bool = False) -> Delta:
    """Parse, verify (checksum, signature) and decode a delta. Every refusal is a DeltaError.

    ``trusted_keys`` (fingerprint -> public key, from ``load_public_keys``): when given, a signed
    delta must be signed by one of them. ``require_signature``: refuse unsigned deltas.
    """
    from safetensors.numpy import load

    if isinstance(source, (bytes, bytearray, memoryview)):
        where, data = "delta", bytes(source)
    else:
        where = str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise DeltaError(f"{where}: cannot read it ({exc.strerror or exc}); give a delta file written by "
                             "`edgetune delta`.") from None
    version, head, body, signed_end = _frame(data, where)
    digest = data[signed_end - 32:signed_end]
    actual = hashlib.sha256(data[:signed_end - 32]).digest()
    if actual != digest:
        raise DeltaError(f"{where}: file is corrupt or was modified: checksum {actual.hex()[:16]}… of its content "
                         f"does not match the recorded {digest.hex()[:16]}…; copy it again from its source.")
    fingerprint, status = _check_signature(where, digest, data[signed_end:], trusted_keys, require_signature)
    try:
        header = schema.parse_header(head)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DeltaError(f"{where}: the header is not UTF-8 JSON ({exc}); the file was not written by edgetune.") from None
    problems = schema.header_problems(header, version)
    if problems:
        raise DeltaError(f"{where}: bad header: {_listing(problems)}; the file was not written by this edgetune "
                         "(or was altered before it was checksummed).")
    try:
        entries = load(body) if body else {}
    except Exception as exc:  # safetensors' own error class is not public
        raise DeltaError(f"{where}: the payload is not a safetensors block ({exc}).") from None
    tensors, problems = codecs.decode_tensors(header["tensors"], entries)
    if problems:
        raise DeltaError(f"{where}: the payload does not match the header: {_listing(problems)}.")
    bad = sorted(name for name, x in tensors.items() if not np.isfinite(x).all())
    if bad:
        raise DeltaError(f"{where}: NaN or Inf values in {len(bad)} tensor(s): {', '.join(bad)}; refusing it.")
    sizes = {info["name"]: sum(int(entries[k].nbytes) for k in info["payload_keys"]) for info in header["tensors"]}
    return Delta(header, tensors, digest.hex(), fingerprint, status, len(data), sizes)


def _listing(problems: list[str], limit: int = 50) -> str:
    """Every problem, joined; past ``limit`` (a hostile file can hold thousands) the rest are counted."""
    shown = "; ".join(problems[:limit])
    return shown if len(problems) <= limit else f"{shown}; and {len(problems) - limit} more problem(s)"


def _frame(data: bytes, where: str) -> tuple[int, bytes, bytes, int]:
    """(version, header bytes, payload bytes, end of the checksum); refuses bad magic, versions, sizes."""
    def need(n: int) -> None:
        if len(data) < n:
            raise DeltaError(f"{where}: the file is truncated or corrupt: it has {len(data)} bytes, its layout "
                             f"needs at least {n}; copy it again.")

    if data[:len(MAGIC)] != MAGIC[:len(data)]:  # a short prefix of the magic is a truncated file, below
        raise DeltaError(f"{where}: not an edgetune delta (it starts with {data[:8]!r}, not {MAGIC!r}); "
                         "give a .etd file written by `edgetune delta`.")
    need(len(MAGIC) + 4)
    (version,) = struct.unpack_from("<I", data, 8)
    if version != FORMAT_VERSION:
        raise DeltaError(f"{where}: delta format version {version} is not supported (this edgetune reads "
                         f"{FORMAT_VERSION}); upgrade edgetune, or copy the file again if it is corrupt.")
    need(20)
    (head_len,) = struct.unpack_from("<Q", data, 12)
    need(20 + head_len + 8)
    (body_len,) = struct.unpack_from("<Q", data, 20 + head_len)
    body_start = 28 + head_len
    need(body_start + body_len + 32)
    return version, data[20:20 + head_len], data[body_start:body_start + body_len], body_start + body_len + 32


def _check_signature(where, digest, block, trusted_keys, require_signature) -> tuple[str | None, str]:
    if not block:
        if require_signature:
            raise DeltaError(f"{where}: the delta is not signed, but a signature by a trusted key is required; "
                             "sign it with `edgetune delta --sign KEY`.")
        return None, "unsigned"
    (n,) = struct.unpack_from("<H", block + b"\0\0", 0)
    if n != 96 or len(block) != 2 + n:
        raise DeltaError(f"{where}: the signature block is malformed or truncated ({len(block)} bytes, expected 98).")
    public, signature = block[2:34], block[34:]
    fingerprint = signing.fingerprint(public)
    if not signing.verify(digest, public, signature):
        raise DeltaError(f"{where}: bad signature (key {fingerprint}); the delta was modified or forged.")
    if trusted_keys is None:
        return fingerprint, "valid"
    trusted = trusted_keys.get(fingerprint)
    if trusted is None or signing.raw_public(trusted) != public:  # compare keys, not just 64-bit fingerprints
        raise DeltaError(f"{where}: signed by unknown key {fingerprint}, which is not among the trusted keys "
                         f"({', '.join(sorted(trusted_keys)) or 'none'}); add its .pub file to the trusted keys "
                         "if you trust that device.")
    return fingerprint, "valid, trusted key"
