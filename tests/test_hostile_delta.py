"""Hostile deltas: checksummed (and re-signed) files whose header or payload break docs/delta-format.md.

A seeded fuzz mutates real deltas (int8, fp16, fp32; signed and unsigned), recomputes the checksum
and re-signs with the same key, then runs each file through what `delta inspect` runs (read_delta +
describe) and what `to-peft` runs (resolve_delta). Each mutation carries its verdict from the doc
(allowed or not, and whether the result still fits the target); a refusal must be one DeltaError
line, an acceptance must match the doc, and nothing else may escape. A few cases also go through
the real CLI against the tiny bundle.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load, save

from edgetune.delta import (AdapterTarget, describe, encode_delta, fingerprint, read_delta, resolve_delta)
from edgetune.delta import signing
from edgetune.errors import DeltaError

BASE = "ab" * 32
METHOD = {"name": "lora", "config": {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"], "use_rslora": False,
                                     "dropout": 0.0, "seed": 0}}
PREFIX = "base_model.model.model.layers.0.self_attn."
TRAINABLE = ((f"q.A", PREFIX + "q_proj.lora_A.weight", (4, 16)), ("q.B", PREFIX + "q_proj.lora_B.weight", (16, 4)),
             ("v.A", PREFIX + "v_proj.lora_A.weight", (4, 16)), ("v.B", PREFIX + "v_proj.lora_B.weight", (8, 4)))
TARGET = AdapterTarget(BASE, METHOD, TRAINABLE)
CODECS = ("int8", "fp16", "fp32")
NAN, INF = float("nan"), float("inf")


def _tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {peft: rng.normal(0, 0.05, shape).astype(np.float32) for _, peft, shape in TRAINABLE}
    out[PREFIX + "v_proj.lora_B.weight"][:] = 0  # an untrained B: int8 all-zero rows (scale 1)
    return out


def _key():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


KEY = _key()
TRUSTED = {fingerprint(KEY.public_key()): KEY.public_key()}


def _split(data: bytes):
    """(header JSON value, payload entries) of a delta file."""
    (n,) = struct.unpack_from("<Q", data, 12)
    (m,) = struct.unpack_from("<Q", data, 20 + n)
    body = data[28 + n:28 + n + m]
    return json.loads(data[20:20 + n]), (load(body) if body else {})


def _pack(header, payload: bytes, key=None) -> bytes:
    """A delta around any header and payload, checksummed, and signed by ``key`` when given.

    json.dumps writes NaN/Infinity literals here, as a hostile writer would.
    """
    head = json.dumps(header, sort_keys=True).encode()
    blob = b"ETDELTA\0" + struct.pack("<IQ", 1, len(head)) + head + struct.pack("<Q", len(payload)) + payload
    digest = hashlib.sha256(blob).digest()
    if key is None:
        return blob + digest
    public, sig = signing.sign(digest, key)
    return blob + digest + struct.pack("<H", 96) + public + sig


# --- mutations: each changes (header, entries) in place and returns (allowed by the doc, still fits TARGET) ---
# Returning None means "does not apply to this delta" (e.g. int8 scales of an fp32 delta).

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


def _base(codec: str, signed: bool, seed: int) -> bytes:
    return encode_delta(_tensors(seed), base_model_sha256=BASE, method=METHOD, codec=codec, num_examples=5,
                        metrics={"loss": 0.5}, signing_key=KEY if signed else None)


def _apply(data: bytes, mutations, rng, signed: bool):
    """(mutated file, allowed, fits, names) or None when a mutation does not apply."""
    header, entries = _split(data)
    allowed, fits, names = True, True, []
    for mutate in mutations:
        try:
            verdict = mutate(header, entries, rng)
        except (KeyError, TypeError, IndexError, ValueError, AttributeError):  # an earlier one removed its target
            verdict = None
        if verdict is None:
            return None
        allowed, fits, names = allowed and verdict[0], fits and verdict[1], names + [mutate.__name__]
    if header.get("__list__"):
        header = [1, 2]
    payload = save(entries) if entries else b""
    return _pack(header, payload, KEY if signed else None), allowed, fits and allowed, names


def _flip_payload_value(data: bytes, rng, signed: bool):
    """Flip one bit in the payload's tensor data; the doc allows it iff every decoded value stays legal."""
    header, entries = _split(data)
    payload = bytearray(save(entries))
    (n,) = struct.unpack_from("<Q", payload, 0)
    i = 8 + n + int(rng.integers(len(payload) - 8 - n))
    payload[i] ^= 1 << int(rng.integers(8))
    after = load(bytes(payload))
    ok = True
    for t in header["tensors"]:
        x = after[t["name"]]
        if t["codec"] == "int8":
            s = after[t["name"] + ".__scale__"]
            ok &= bool((x >= -127).all() and np.isfinite(s).all() and (s > 0).all())
        else:
            ok &= bool(np.isfinite(x).all())
    return _pack(header, bytes(payload), KEY if signed else None), ok, ok, ["bit flip in payload data"]


def _check(data: bytes, allowed: bool, fits: bool, signed: bool, names) -> None:
    """Run ``data`` through inspect's and to-peft's entry points; compare with the doc's verdict."""
    trusted = TRUSTED if signed else None
    try:
        delta = read_delta(data, trusted_keys=trusted, require_signature=signed)
        describe(delta, "hostile.etd")
    except DeltaError as exc:
        assert not allowed, f"{names}: the doc allows it, but read_delta refused: {exc}"
        assert "\n" not in str(exc), f"{names}: not one line: {exc}"
        with pytest.raises(DeltaError):
            resolve_delta(data, TARGET, trusted_keys=trusted)
        return
    assert allowed, f"{names}: the doc forbids it, but read_delta accepted it"
    try:
        resolved = resolve_delta(data, TARGET, trusted_keys=trusted)
    except DeltaError as exc:
        assert not fits, f"{names}: fits the target, but resolve_delta refused: {exc}"
        assert "\n" not in str(exc)
        return
    assert fits, f"{names}: does not fit the target, but resolve_delta accepted it"
    assert set(resolved.by_graph) == {g for g, _, _ in TRAINABLE}
    assert all(resolved.by_graph[g].shape == s and np.isfinite(resolved.by_graph[g]).all() for g, _, s in TRAINABLE)


BASES = {(codec, signed): _base(codec, signed, seed) for seed, (codec, signed) in
         enumerate((c, s) for c in CODECS for s in (False, True))}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.__name__)
def test_each_mutation_alone(mutation):
    """Every mutation on every base delta it applies to (int8, fp16, fp32; signed and unsigned)."""
    rng = np.random.default_rng(0)
    applied = 0
    for (codec, signed), data in BASES.items():
        case = _apply(data, [mutation], rng, signed)
        if case is not None:
            _check(case[0], *case[1:3], signed, case[3])
            applied += 1
    assert applied >= 2


def test_seeded_fuzz_of_combined_mutations_and_payload_bit_flips():
    rng = np.random.default_rng(2026)
    keys = list(BASES)
    done = refused = 0
    while done < 400:
        codec, signed = keys[int(rng.integers(len(keys)))]
        if rng.random() < 0.25:
            case = _flip_payload_value(BASES[(codec, signed)], rng, signed)
        else:
            picks = [MUTATIONS[int(i)] for i in rng.integers(len(MUTATIONS), size=int(rng.integers(1, 4)))]
            zones = [m.zone for m in picks]
            if len(set(zones)) < len(zones) or ("*" in zones and len(zones) > 1):
                continue
            case = _apply(BASES[(codec, signed)], picks, rng, signed)
        if case is None:
            continue
        _check(case[0], *case[1:3], signed, case[3])
        done, refused = done + 1, refused + (not case[1])
    assert 0 < refused < done  # the fuzz exercised both verdicts


def test_unmutated_repack_is_accepted_and_a_foreign_signature_is_refused():
    for (codec, signed), data in BASES.items():
        case = _apply(data, [], np.random.default_rng(0), signed)
        _check(case[0], True, True, signed, ["no mutation"])
    header, entries = _split(BASES[("int8", True)])
    forged = _pack(header, save(entries), _key())  # valid signature by a key outside the trusted set
    with pytest.raises(DeltaError, match="signed by unknown key"):
        resolve_delta(forged, TARGET, trusted_keys=TRUSTED)


def test_a_malformed_header_lists_every_problem_in_one_error():
    header, entries = _split(BASES[("int8", False)])
    header["method"]["config"] = []
    header["metrics"]["loss"] = "low"
    header["codec"], header["num_examples"], header["created_at"], header["producer"] = "int4", True, "yesterday", {}
    with pytest.raises(DeltaError) as err:
        read_delta(_pack(header, save(entries)))
    msg = str(err.value)
    for part in ("`method` must be", "metric 'loss' must be a finite number, got 'low'", "`codec` must be one of",
                 "`num_examples` must be a whole number", "`created_at` must be", "`producer` must be"):
        assert part in msg, part


def test_thousands_of_problems_make_one_bounded_line():
    header, entries = _split(BASES[("fp32", False)])
    header["metrics"] = {f"m{i}": "bad" for i in range(3000)}
    with pytest.raises(DeltaError) as err:
        read_delta(_pack(header, save(entries)))
    msg = str(err.value)
    assert "and 2950 more problem(s)" in msg and msg.count("must be a finite number") == 50 and "\n" not in msg


def test_duplicate_keys_and_non_json_headers_are_refused():
    header, entries = _split(BASES[("fp32", False)])
    head = json.dumps(header, sort_keys=True)
    doubled = head[:-1] + ', "num_examples": 7}'  # a second num_examples: which one counts is ambiguous
    for bad in (doubled, head[:-1], "[" * 5000 + "]" * 5000):
        blob = b"ETDELTA\0" + struct.pack("<IQ", 1, len(bad)) + bad.encode() + struct.pack("<Q", 0)
        with pytest.raises(DeltaError, match="header is not UTF-8 JSON") as err:
            read_delta(blob + hashlib.sha256(blob).digest())
        assert "\n" not in str(err.value)


# --- the real CLI, against the tiny bundle ----------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgetune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def _with_first(q: np.ndarray, value) -> np.ndarray:
    q = q.copy()
    q.flat[0] = value
    return q


CLI_CASES = {
    "method.config = []": (lambda h, e: h["method"].__setitem__("config", []), False),
    "string metric": (lambda h, e: h["metrics"].__setitem__("loss", "low"), False),
    "codec int4": (lambda h, e: h.__setitem__("codec", "int4"), False),
    "int8 value -128": (lambda h, e: e.__setitem__(h["tensors"][0]["name"], _with_first(e[h["tensors"][0]["name"]], -128)),
                        False),
    "other loss (allowed)": (lambda h, e: h["metrics"].__setitem__("loss", 0.25), True),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_refuses_with_one_line_and_exit_2(case, tiny_bundle, tmp_path):
    from edgetune.bundle import read_manifest

    manifest = read_manifest(tiny_bundle)
    rng = np.random.default_rng(3)
    tensors = {t.peft_key: rng.normal(0, 0.05, t.shape).astype(np.float32) for t in manifest.trainable}
    method = {"name": manifest.method["name"], "config": manifest.method["config"]}
    header, entries = _split(encode_delta(tensors, base_model_sha256=manifest.base_sha256, method=method,
                                          codec="int8", metrics={"loss": 0.5}, signing_key=KEY))
    change, allowed = CLI_CASES[case]
    change(header, entries)
    path = tmp_path / "hostile.etd"
    path.write_bytes(_pack(header, save(entries), KEY))
    (tmp_path / "k.pub").write_text(signing.raw_public(KEY.public_key()).hex())
    for args in (("delta", "inspect", path, "--trusted-key", tmp_path / "k.pub"),
                 ("to-peft", path, "--bundle", tiny_bundle, "--out", tmp_path / "peft", "--trusted-key", tmp_path / "k.pub")):
        r = _cli(*args)
        assert "Traceback" not in r.stderr, r.stderr
        if allowed:
            assert r.returncode == 0, r.stderr
        else:
            assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "hostile.etd" in r.stderr, r.stderr
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file() == allowed
