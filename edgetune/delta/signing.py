"""Ed25519 signatures of deltas (the ``cryptography`` package).

Key files (``edgetune keygen --out device.key``):

* ``device.key``: the private key, PKCS#8 PEM, unencrypted, file mode 0600. Never overwritten.
* ``device.key.pub``: the public key, SubjectPublicKeyInfo PEM (``-----BEGIN PUBLIC KEY-----``).
  Readers also accept a file holding the 32 raw key bytes as 64 hex digits (one line).

A key's fingerprint is the first 16 hex digits of the SHA-256 of its 32 raw bytes; it is what
``delta inspect`` shows and what errors name. A delta's signature covers its 32-byte checksum.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from edgetune.errors import DeltaError

_HEX_KEY = re.compile(rb"\s*([0-9a-fA-F]{64})\s*")


def _serialization():
    from cryptography.hazmat.primitives import serialization

    return serialization


def raw_public(public_key) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    s = _serialization()
    return public_key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)


def fingerprint(public_key) -> str:
    """First 16 hex digits of SHA-256 of the raw public key; takes a key object or its 32 raw bytes."""
    raw = bytes(public_key) if isinstance(public_key, (bytes, bytearray)) else raw_public(public_key)
    return hashlib.sha256(raw).hexdigest()[:16]




def generate_keypair(path: Path | str) -> str:
    """Write a new key pair to ``path`` and ``path.pub``; refuses to overwrite. Returns the fingerprint."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    s = _serialization()
    path, pub = Path(path), Path(f"{path}.pub")
    for p in (path, pub):
        if p.exists():
            raise DeltaError(f"{p} already exists; choose another --out (a key is never overwritten).")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    public_pem = key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo)
    try:
        _write_new(path, pem, 0o600)  # O_EXCL: a key appearing meanwhile is not clobbered either
        _write_new(pub, public_pem, 0o644)
    except FileExistsError as exc:
        raise DeltaError(f"{exc.filename} already exists; choose another --out (a key is never overwritten).") from None
    except OSError as exc:
        raise DeltaError(f"cannot write the key pair {path}: {exc.strerror or exc}; choose a writable folder.") from None
    return fingerprint(key.public_key())


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def load_private_key(path: Path | str):
    """The Ed25519 private key in ``path`` (PKCS#8 PEM, unencrypted)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read(path, "private key")
    if b"PUBLIC KEY" in data or _HEX_KEY.fullmatch(data):
        raise DeltaError(f"{path}: this is a public key; signing needs the private key file (without .pub).")
    try:
        key = _serialization().load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise DeltaError(f"{path}: not a readable private key ({exc}); make one with `edgetune keygen`.") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise DeltaError(f"{path}: a {type(key).__name__}, not an Ed25519 key; make one with `edgetune keygen`.")
    return key


def load_public_key(path: Path | str):
    """The Ed25519 public key in ``path``: SubjectPublicKeyInfo PEM, or 64 hex digits."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read(path, "public key")
    if b"PRIVATE KEY" in data:
        raise DeltaError(f"{path}: this is a private key; give its public half (the .pub file) instead, "
                         "and keep the private key on the device.")
    hex_key = _HEX_KEY.fullmatch(data)
    try:
        if hex_key:
            return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key.group(1).decode()))
        key = _serialization().load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise DeltaError(f"{path}: not a readable public key ({exc}); give the .pub file from `edgetune keygen`.") from None
    if not isinstance(key, Ed25519PublicKey):
        raise DeltaError(f"{path}: a {type(key).__name__}, not an Ed25519 public key; give the .pub file from "
                         "`edgetune keygen`.")
    return key


def _read(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DeltaError(f"{path}: cannot read the {what} ({exc.strerror or exc}).") from None


def load_public_keys(paths) -> dict[str, object]:
    """fingerprint -> public key for every trusted key file; every bad file is named in one error."""
    keys, problems = {}, []
    for p in paths:
        try:
            key = load_public_key(p)
        except DeltaError as exc:
            problems.append(str(exc).rstrip("."))
            continue
        keys[fingerprint(key)] = key
    if problems:
        raise DeltaError(f"{len(problems)} trusted key file(s) unusable: " + "; ".join(problems) + ".")
    return keys


def fingerprint_file(path: Path | str) -> str:
    return fingerprint(load_public_key(path))


def sign(digest: bytes, private_key) -> tuple[bytes, bytes]:
    """(raw public key, 32 bytes; Ed25519 signature of ``digest``, 64 bytes)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not isinstance(private_key, Ed25519PrivateKey):
        raise DeltaError(f"signing_key must be an Ed25519 private key (from load_private_key), got "
                         f"{type(private_key).__name__}.")
    return raw_public(private_key.public_key()), private_key.sign(digest)


def verify(digest: bytes, public_raw: bytes, signature: bytes) -> bool:
    """True when ``signature`` is the Ed25519 signature of ``digest`` by the raw key ``public_raw``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_raw)).verify(bytes(signature), digest)
        return True
    except (InvalidSignature, ValueError):
        return False
