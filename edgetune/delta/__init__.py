"""Adapter deltas: what a device ships. No torch: used on devices and on the collector.

The ``.etd`` container is described in docs/delta-format.md.
"""

from edgetune.delta.codecs import CODECS, Codec, reconstruction_error, register as register_codec
from edgetune.delta.compat import apply_diff, check_compatible, diff
from edgetune.delta.describe import describe
from edgetune.delta.format import FORMAT_VERSION, KINDS, MAGIC, Delta, encode_delta, read_delta, write_delta
from edgetune.delta.resolve import AdapterTarget, ResolvedAdapter, fits, read_reference, resolve_delta
from edgetune.delta.signing import (fingerprint, fingerprint_file, generate_keypair, load_private_key,
                                    load_public_key, load_public_keys)

__all__ = ["AdapterTarget", "CODECS", "FORMAT_VERSION", "KINDS", "MAGIC", "Codec", "Delta", "apply_diff", "check_compatible",
           "describe", "diff", "encode_delta", "fingerprint", "fingerprint_file", "generate_keypair",
           "load_private_key", "load_public_key", "load_public_keys", "read_delta", "reconstruction_error",
           "register_codec", "ResolvedAdapter", "fits", "read_reference", "resolve_delta", "write_delta"]
