"""Ed25519 signatures of deltas (the ``cryptography`` package).

``edgetune keygen --out device.key`` writes the private key as PKCS#8 PEM (mode 600) and the
public key as PEM to ``device.key.pub``. A key's fingerprint is the first 16 hex digits of the
SHA-256 of its 32 raw bytes; it is what ``delta inspect`` shows and what errors name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from edgetune.errors import DeltaError


def _serialization():
    from cryptography.hazmat.primitives import serialization

    return serialization


def raw_public(public_key) -> bytes:
    s = _serialization()
    return public_key.public_bytes(s.Encoding.Raw, s.PublicFormat.Raw)


def fingerprint_raw(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(path: Path) -> str:
    """Write a new key pair; refuses to overwrite. Returns the fingerprint."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    s = _serialization()
    path, pub = Path(path), Path(f"{path}.pub")
    for p in (path, pub):
        if p.exists():
            raise DeltaError(f"{p} already exists; choose another --out (a key is never overwritten).")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_bytes(key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
    return fingerprint_raw(raw_public(key.public_key()))


def load_private_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = _serialization().load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise DeltaError(f"{path}: not a readable Ed25519 private key ({exc}); make one with `edgetune keygen`.") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise DeltaError(f"{path}: not an Ed25519 key; make one with `edgetune keygen`.")
    return key


def load_public_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = _serialization().load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise DeltaError(f"{path}: not a readable Ed25519 public key ({exc}); give the .pub file from `edgetune keygen`.") from None
    if not isinstance(key, Ed25519PublicKey):
        raise DeltaError(f"{path}: not an Ed25519 public key.")
    return key


def load_public_keys(paths: list[Path]) -> dict[str, object]:
    """fingerprint -> public key, for every trusted key file."""
    keys = {}
    for p in paths:
        key = load_public_key(p)
        keys[fingerprint_raw(raw_public(key))] = key
    return keys


def fingerprint_file(path: Path) -> str:
    return fingerprint_raw(raw_public(load_public_key(path)))


def sign(digest: bytes, private_key) -> tuple[bytes, bytes]:
    """(raw public key 32 bytes, signature 64 bytes) over ``digest``."""
    return raw_public(private_key.public_key()), private_key.sign(digest)


def verify(digest: bytes, public_raw: bytes, signature: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, digest)
        return True
    except (InvalidSignature, ValueError):
        return False
