"""The ``.etd`` header schema: every field, its type and range (docs/delta-format.md, "Header").

``header_problems(header, version)`` lists every way a parsed header breaks the schema, so
``read_delta`` refuses a checksummed but malformed header once, naming all problems, and nothing
after it (``check_compatible``, ``describe``, ``to-peft``) meets a field it did not expect.
``parse_header`` turns the header bytes into JSON, refusing NaN/Infinity and duplicate keys.

JSON booleans are never numbers here (Python's ``True`` is an ``int``): counts are ``type(v) is int``.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from datetime import datetime

from edgetune.delta import codecs

KINDS = ("full", "diff")
HEX64 = re.compile(r"[0-9a-f]{64}")
# ISO-8601 UTC to the second, as the writer makes it: 2025-01-31T12:00:00+00:00 ("Z" also accepted).
_CREATED_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\+00:00|Z)")
MAX_COUNT = 2 ** 63 - 1  # num_examples must fit a signed 64-bit integer (weighted aggregation sums them)
FIELDS = ("base_model_sha256", "codec", "created_at", "format_version", "kind", "method", "metrics",
          "num_examples", "producer", "round_id", "since_sha256", "tensors")
TENSOR_FIELDS = ("codec", "dtype", "error", "name", "payload_keys", "shape")
ERROR_FIELDS = ("max_abs", "rel_l2")
METHOD_FIELDS = ("config", "name")


class NonFinite:
    """A ``NaN``/``Infinity`` literal in the header: kept as a marker so the schema names where it is."""

    def __init__(self, literal: str):
        self.literal = literal

    def __repr__(self) -> str:
        return self.literal


def parse_header(head: bytes):
    """The header's JSON value; ValueError (with the reason) for non-JSON or duplicate keys.

    ``NaN``/``Infinity`` literals (which Python's json reads by default) become ``NonFinite``
    markers, which no field accepts.
    """
    def no_constants(name: str):
        return NonFinite(name)

    def no_duplicates(pairs):
        out = dict(pairs)
        if len(out) != len(pairs):  # linear: a hostile header may hold objects with many keys
            seen, dupes = set(), []
            for k, _ in pairs:
                if k in seen:
                    dupes.append(k)
                seen.add(k)
            raise ValueError(f"duplicate key(s) {_short(sorted(set(dupes)))}")
        return out

    return json.loads(head.decode("utf-8"), parse_constant=no_constants, object_pairs_hook=no_duplicates)


def finite_number(value) -> bool:
    """A JSON number (int or float, not a boolean) that is finite as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond float's range
        return False


def count(value) -> bool:
    """A whole number 0 <= n <= 2^63 - 1 (not a boolean, not 3.0)."""
    return type(value) is int and 0 <= value <= MAX_COUNT


def utc_timestamp(value) -> bool:
    """ISO-8601 UTC to the second (``2025-01-31T12:00:00+00:00`` or ``...Z``) naming a real date and time."""
    if not (isinstance(value, str) and _CREATED_AT.fullmatch(value)):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:  # e.g. month 13
        return False
    return True


def header_problems(header, version: int) -> list[str]:
    """Every schema problem of a parsed header (empty when it is well formed)."""
    if not isinstance(header, dict):
        return [f"the header is a JSON {type(header).__name__}, not an object"]
    problems = [f"`{key}` missing" for key in FIELDS if key not in header]
    unknown = sorted(set(header) - set(FIELDS))
    if unknown:
        problems.append(f"unknown field(s) {_short(unknown)}")
    h = {key: header.get(key) for key in FIELDS}
    present = set(header)

    def bad(key: str, want: str) -> None:
        problems.append(f"`{key}` must be {want}, got {_short(h[key])}")

    if "format_version" in present and not (type(h["format_version"]) is int and h["format_version"] == version):
        bad("format_version", f"{version} (the file's version field)")
    if "base_model_sha256" in present and not (isinstance(h["base_model_sha256"], str)
                                               and HEX64.fullmatch(h["base_model_sha256"])):
        bad("base_model_sha256", "64 lowercase hex digits")
    if "method" in present:
        problems += _method_problems(h["method"])
    if "kind" in present and h["kind"] not in KINDS:
        bad("kind", " or ".join(map(repr, KINDS)))
    if "since_sha256" in present:
        since_ok = isinstance(h["since_sha256"], str) and HEX64.fullmatch(h["since_sha256"])
        if h["kind"] == "diff" and not since_ok:
            bad("since_sha256", "64 lowercase hex digits for a diff (the checksum of the delta it is relative to)")
        elif h["kind"] != "diff" and h["since_sha256"] is not None:
            bad("since_sha256", "null unless kind is 'diff'")
    codec_ok = isinstance(h["codec"], str) and h["codec"] in codecs.CODECS
    if "codec" in present and not codec_ok:
        bad("codec", f"one of {', '.join(codecs.CODECS)}")
    if "tensors" in present:
        problems += _tensors_problems(h["tensors"], h["codec"] if codec_ok else None)
    if "num_examples" in present and not count(h["num_examples"]):
        bad("num_examples", f"a whole number from 0 to {MAX_COUNT} (not true/false)")
    if "round_id" in present and not (h["round_id"] is None or isinstance(h["round_id"], str)):
        bad("round_id", "a string or null")
    if "metrics" in present:
        if not isinstance(h["metrics"], dict):
            bad("metrics", "an object of name -> finite number")
        else:
            problems += [f"metric {_short(k)} must be a finite number, got {_short(v)}"
                         for k, v in h["metrics"].items() if not finite_number(v)]
    if "created_at" in present and not utc_timestamp(h["created_at"]):
        bad("created_at", "an ISO-8601 UTC time to the second, e.g. 2025-01-31T12:00:00+00:00")
    if "producer" in present:
        p = h["producer"]
        if not (isinstance(p, dict) and isinstance(p.get("edgetune"), str) and p["edgetune"]
                and all(isinstance(v, str) for v in p.values())):
            bad("producer", "an object of strings with a non-empty 'edgetune' version")
    return problems


def _method_problems(method) -> list[str]:
    if not (isinstance(method, dict) and set(method) == set(METHOD_FIELDS) and isinstance(method["name"], str)
            and method["name"] and isinstance(method["config"], dict)):
        return [f"`method` must be {{\"name\": non-empty string, \"config\": object}}, got {_short(method)}"]
    bad = sorted(_non_finite_paths(method["config"], "method.config"))
    return [f"`{path}` is NaN or Infinity, which JSON and the format forbid" for path in bad]


def _non_finite_paths(value, path: str):
    """Paths of NonFinite markers inside a free-form JSON value (iterative: nesting can be deep)."""
    stack = [(value, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, NonFinite):
            yield where
        elif isinstance(node, dict):
            stack += [(v, f"{where}.{k}") for k, v in node.items()]
        elif isinstance(node, list):
            stack += [(v, f"{where}[{i}]") for i, v in enumerate(node)]


def _tensors_problems(tensors, codec: str | None) -> list[str]:
    """Problems of the tensor list; ``codec`` is the header's codec when it is a known one."""
    if not isinstance(tensors, list):
        return [f"`tensors` must be a list, got {_short(tensors)}"]
    problems, names, owners = [], [], {}
    for i, info in enumerate(tensors):
        entry = _tensor_problems(info, codec)
        label = info.get("name") if isinstance(info, dict) else None
        label = f"tensor entry {i} ({label if isinstance(label, str) else _short(info)})"
        if entry:
            problems.append(f"{label} is malformed: {', '.join(entry)}")
            continue
        names.append(info["name"])
        for key in info["payload_keys"]:  # e.g. int8 tensors "w" and "w.__scale__" would share a key
            if key in owners:
                problems.append(f"{label} uses payload key {key!r} of tensor {owners[key]!r}")
            owners.setdefault(key, info["name"])
    if names != sorted(set(names)):
        problems.append("tensor entries must be sorted by name without duplicates")
    return problems


def _tensor_problems(info, codec: str | None) -> list[str]:
    if not isinstance(info, dict):
        return ["not an object"]
    out = [f"`{k}` missing" for k in TENSOR_FIELDS if k not in info]
    extra = sorted(set(info) - set(TENSOR_FIELDS))
    if extra:
        out.append(f"unknown field(s) {_short(extra)}")
    name, shape, error = info.get("name"), info.get("shape"), info.get("error")
    name_ok = isinstance(name, str) and bool(name)
    if "name" in info and not name_ok:
        out.append("`name` must be a non-empty string")
    if "shape" in info and not (isinstance(shape, list) and all(type(d) is int and 0 < d <= MAX_COUNT for d in shape)):
        out.append(f"`shape` must be a list of positive whole numbers, got {_short(shape)}")
    if "dtype" in info and info["dtype"] != "float32":
        out.append(f"`dtype` must be 'float32', got {_short(info['dtype'])}")
    own = info.get("codec")
    if "codec" in info:
        if not (isinstance(own, str) and own in codecs.CODECS):
            out.append(f"uses codec {_short(own)}, a codec this edgetune does not know ({', '.join(codecs.CODECS)})")
        elif codec is not None and own != codec:
            out.append(f"codec {own!r} differs from the header's codec {codec!r}")
    if "payload_keys" in info and name_ok and isinstance(own, str) and own in codecs.CODECS:
        want = sorted(codecs.CODECS[own].payload_keys(name))
        if info["payload_keys"] != want:
            out.append(f"`payload_keys` must be {want} for codec {own}, got {_short(info['payload_keys'])}")
    if "error" in info and not (isinstance(error, dict) and set(error) == set(ERROR_FIELDS)
                                and all(finite_number(v) and v >= 0 for v in error.values())):
        out.append(f"`error` must be {{\"max_abs\", \"rel_l2\"}} of finite numbers >= 0, got {_short(error)}")
    return out


def _short(value) -> str:
    """A short repr: hostile headers can hold megabytes, or deep nesting, in one field."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 3
