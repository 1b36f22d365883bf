"""Adapter deltas: what a device ships. No torch: used on devices and on the collector."""

from edgetune.delta.codecs import CODECS, reconstruction_error
from edgetune.delta.compat import apply_diff, check_compatible, diff
from edgetune.delta.describe import describe
from edgetune.delta.format import FORMAT_VERSION, Delta, encode_delta, read_delta, write_delta
from edgetune.delta.signing import fingerprint_file, generate_keypair, load_private_key, load_public_keys

__all__ = ["CODECS", "FORMAT_VERSION", "Delta", "apply_diff", "check_compatible", "describe", "diff", "encode_delta",
           "fingerprint_file", "generate_keypair", "load_private_key", "load_public_keys", "read_delta",
           "reconstruction_error", "write_delta"]
