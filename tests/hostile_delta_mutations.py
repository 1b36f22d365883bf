"""The mutation table of tests/test_hostile_delta.py: each entry breaks (or harmlessly changes) a delta.

A mutation changes a parsed header and the payload entries in place and returns its verdict from
docs/delta-format.md: (allowed by the format, still fits the test's target), or None when it does
not apply to that delta (e.g. int8 scales of an fp32 delta). ``zone``: mutations in one zone may
undo each other (kind=diff, then a since hash), so the fuzz combines at most one per zone.
"""

from __future__ import annotations

import numpy as np

CODECS = ("int8", "fp16", "fp32")
NAN, INF = float("nan"), float("inf")


def _tensor(h, rng):
    return h["tensors"][int(rng.integers(len(h["tensors"])))]


def _set(path, value, allowed=False, fits=False):
    """Mutation setting header[path...] = value (path items: keys, or "T" for a random tensor entry)."""
    def mutate(h, e, rng):
        node = h
        for step in path[:-1]:
            node = _tensor(h, rng) if step == "T" else node[step]
        node[path[-1]] = value() if callable(value) else value
        return allowed, fits and allowed
    mutate.__name__ = f"set {'.'.join(map(str, path))}={value!r}"[:80]
    mutate.zone = _zone(path[0])
    return mutate


def _delete(path):
    def mutate(h, e, rng):
        node = h
        for step in path[:-1]:
            node = _tensor(h, rng) if step == "T" else node[step]
        del node[path[-1]]
        return False, False
    mutate.__name__ = f"delete {'.'.join(path)}"
    mutate.zone = _zone(path[0])
    return mutate


def _zone(key: str) -> str:
    """Mutations in one zone may undo each other (kind=diff, then a since hash): combine one per zone."""
    return "kind" if key == "since_sha256" else key


def _payload(fn, name, zone="tensors"):
    """Mutation of the payload entries: fn(h, entries, tensor entry, rng) -> (allowed, fits) or None."""
    def mutate(h, e, rng):
        return fn(h, e, _tensor(h, rng), rng)
    mutate.__name__, mutate.zone = name, zone
    return mutate


def _int8_value(value):
    def fn(h, e, t, rng):
        if t["codec"] != "int8":
            return None
        q = e[t["name"]].copy()
        q.flat[int(rng.integers(q.size))] = value
        e[t["name"]] = q
        return -127 <= value <= 127, True
    return fn


def _float_value(value):
    def fn(h, e, t, rng):
        if t["codec"] == "int8":
            return None
        x = e[t["name"]].copy()
        x.flat[int(rng.integers(x.size))] = value
        e[t["name"]] = x
        return bool(np.isfinite(x).all()), True
    return fn


def _scale(value):
    def fn(h, e, t, rng):
        if t["codec"] != "int8":
            return None
        key = t["name"] + ".__scale__"
        s = e[key].copy()
        s[int(rng.integers(s.size))] = value
        e[key] = s
        return bool(np.isfinite(s).all() and (s > 0).all()), True
    return fn


def _scale_dtype(h, e, t, rng):  # readers accept float16 or float32 scales
    if t["codec"] != "int8":
        return None
    key = t["name"] + ".__scale__"
    e[key] = e[key].astype(np.float32 if e[key].dtype == np.float16 else np.float16)
    return bool(np.isfinite(e[key]).all() and (e[key] > 0).all()), True


def _retype(dtype):
    def fn(h, e, t, rng):
        if e[t["name"]].dtype == dtype:
            return None
        e[t["name"]] = e[t["name"]].astype(dtype)
        return False, False
    return fn


def _reshape_payload(h, e, t, rng):
    e[t["name"]] = e[t["name"]].reshape(-1)
    return len(t["shape"]) == 1, True


def _extra_entry(h, e, t, rng):
    e["stray"] = np.zeros(3, np.float32)
    return False, False


def _drop_entry(h, e, t, rng):
    del e[t["payload_keys"][-1]]
    return False, False


def _drop_tensor(h, e, t, rng):  # consistent removal: a well-formed delta for another adapter
    h["tensors"].remove(t)
    for k in t["payload_keys"]:
        del e[k]
    return True, False


def _rename_tensor(h, e, t, rng):  # consistent rename, kept sorted: well formed, does not fit
    new = "zz." + t["name"]
    for k in t["payload_keys"]:
        e[k.replace(t["name"], new, 1)] = e.pop(k)
    t["name"], t["payload_keys"] = new, sorted(k.replace(t["name"], new, 1) for k in t["payload_keys"])
    h["tensors"].sort(key=lambda info: info["name"])
    return True, False


def _unsorted(h, e, t, rng):
    h["tensors"].reverse()
    return False, False


def _duplicate(h, e, t, rng):
    h["tensors"].append(dict(t))
    h["tensors"].sort(key=lambda info: info["name"])
    return False, False


def _other_known_codec(h, e, t, rng):  # a tensor's codec differs from the header's
    t["codec"] = next(c for c in CODECS if c != t["codec"])
    return False, False


def _top_codec_over(h, e, t, rng):  # e.g. top-level fp16 over int8 tensors
    h["codec"] = next(c for c in CODECS if c != h["codec"])
    return False, False


def _kind_diff_without_since(h, e, t, rng):
    h["kind"], h["since_sha256"] = "diff", None
    return False, False


def _full_with_since(h, e, t, rng):
    h["since_sha256"] = "cd" * 32
    return False, False


def _header_not_object(h, e, t, rng):
    h.clear()
    h["__list__"] = True  # replaced by a list in _apply
    return False, False


MUTATIONS = [
    # the cases found when tried as an attacker would
    _set(("method", "config"), []), _set(("metrics", "loss"), "low"), _set(("codec",), "int4"),
    _payload(_top_codec_over, "top-level codec over other tensors", "codec"), _set(("tensors", "T", "dtype"), "float16"),
    _set(("num_examples",), -1), _set(("num_examples",), True), _set(("metrics", "loss"), NAN),
    _set(("tensors", "T", "error", "rel_l2"), INF), _set(("tensors", "T", "error", "max_abs"), -0.1),
    _set(("created_at",), "yesterday"), _set(("producer",), {}), _payload(_int8_value(-128), "int8 value -128"),
    # more header breakage
    _set(("method", "config", "alpha"), NAN), _set(("method", "config", "targets"), [INF]),
    _set(("method",), []), _set(("method",), "lora"), _set(("method",), {"name": "lora"}),
    _set(("method", "name"), ""), _set(("method", "name"), 3), _set(("method", "extra"), 1),
    _set(("metrics",), []), _set(("metrics", "loss"), INF), _set(("metrics", "loss"), True),
    _set(("metrics", "loss"), None), _set(("codec",), 7), _set(("codec",), None), _set(("codec",), "zstd"),
    _set(("tensors", "T", "codec"), "int4"), _payload(_other_known_codec, "tensor codec != header codec"),
    _set(("tensors", "T", "dtype"), "bfloat16"), _set(("num_examples",), 1.5), _set(("num_examples",), "3"),
    _set(("num_examples",), 2 ** 64), _set(("num_examples",), None), _set(("tensors", "T", "error"), {}),
    _set(("tensors", "T", "error"), [0.0, 0.0]), _set(("tensors", "T", "error", "max_abs"), NAN),
    _set(("tensors", "T", "error", "max_abs"), "0"), _set(("tensors", "T", "error", "extra"), 0.0),
    _set(("tensors", "T", "error", "rel_l2"), False), _set(("created_at",), "2025-13-01T00:00:00+00:00"),
    _set(("created_at",), "2025-01-31T12:00:00+02:00"), _set(("created_at",), "2025-01-31"),
    _set(("created_at",), 17), _set(("created_at",), "2025-01-31T12:00:00.5+00:00"), _set(("producer",), []),
    _set(("producer",), {"device": "pi"}), _set(("producer", "edgetune"), 1), _set(("producer", "edgetune"), ""),
    _set(("producer", "steps"), 3), _payload(_kind_diff_without_since, "diff without since", "kind"),
    _payload(_full_with_since, "full with since", "kind"), _set(("kind",), "partial"), _set(("kind",), None),
    _set(("base_model_sha256",), "AB" * 32), _set(("base_model_sha256",), "ab" * 31), _set(("base_model_sha256",), 5),
    _set(("format_version",), 2), _set(("format_version",), True), _set(("format_version",), "1"),
    _set(("round_id",), 5), _set(("round_id",), []), _set(("extra_field",), 1), _set(("tensors",), {}),
    _set(("tensors",), "all"), _set(("tensors", "T", "shape"), [0, 4]), _set(("tensors", "T", "shape"), [-4, 16]),
    _set(("tensors", "T", "shape"), [True, 16]), _set(("tensors", "T", "shape"), [4.0, 16]),
    _set(("tensors", "T", "shape"), "4x16"), _set(("tensors", "T", "shape"), [16, 4, 1]),
    _set(("tensors", "T", "name"), ""), _set(("tensors", "T", "name"), 12), _set(("tensors", "T", "payload_keys"), []),
    _set(("tensors", "T", "payload_keys"), "x"), _set(("tensors", "T", "extra"), 1), _delete(("tensors", "T", "error")),
    _delete(("tensors", "T", "shape")), _payload(_unsorted, "tensor entries reversed"),
    _payload(_duplicate, "duplicated tensor entry"), _payload(_header_not_object, "header is a list", "*"),
    *[_delete((k,)) for k in ("base_model_sha256", "codec", "created_at", "format_version", "kind", "method",
                              "metrics", "num_examples", "producer", "round_id", "since_sha256", "tensors")],
    # payload breakage
    _payload(_int8_value(-127), "int8 value -127"), _payload(_int8_value(127), "int8 value 127"),
    _payload(_float_value(NAN), "NaN value"), _payload(_float_value(INF), "Inf value"),
    _payload(_float_value(-3.5), "other finite value"), _payload(_scale(0.0), "zero scale"),
    _payload(_scale(-0.01), "negative scale"), _payload(_scale(NAN), "NaN scale"), _payload(_scale(INF), "Inf scale"),
    _payload(_scale(0.5), "other positive scale"), _payload(_scale_dtype, "scale dtype switched"),
    _payload(_retype(np.float64), "payload as float64"), _payload(_retype(np.int16), "payload as int16"),
    _payload(_retype(np.float16), "payload as float16"), _payload(_reshape_payload, "payload flattened"),
    _payload(_extra_entry, "unlisted payload entry"), _payload(_drop_entry, "missing payload entry"),
    # what the doc allows (some of which no longer fit the target)
    _set(("metrics", "loss"), 0.125, True, True), _set(("metrics", "steps"), 3, True, True),
    _set(("metrics",), {}, True, True), _set(("round_id",), "r9", True, True), _set(("round_id",), None, True, True),
    _set(("num_examples",), 0, True, True), _set(("num_examples",), 2 ** 63 - 1, True, True),
    _set(("created_at",), "2031-02-28T23:59:59+00:00", True, True), _set(("created_at",), "2025-01-31T12:00:00Z", True, True),
    _set(("producer", "device"), "pi5", True, True), _set(("method", "config", "seed"), 99, True, True),
    _set(("method", "config", "rank"), 8, True, False), _set(("method", "name"), "ia3", True, False),
    _set(("base_model_sha256",), "cd" * 32, True, False), _set(("tensors", "T", "error", "max_abs"), 0.5, True, True),
    _set(("tensors", "T", "error", "rel_l2"), 0, True, True),
    _payload(_drop_tensor, "tensor removed consistently"), _payload(_rename_tensor, "tensor renamed consistently"),
]
