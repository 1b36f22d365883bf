"""Hostile deltas: checksummed (and re-signed) files whose header or payload break docs/delta-format.md.

A seeded fuzz mutates real deltas (int8, fp16, fp32; signed and unsigned), recomputes the checksum
and re-signs with the same key, then runs each file through what `delta inspect` runs (read_delta +
describe) and what `to-peft` runs (resolve_delta). Each mutation carries its verdict from the doc
(allowed or not, and whether the result still fits the target); a refusal must be one DeltaError
line, an acceptance must match the doc, and nothing else may escape. A few cases also go through
the real CLI against the tiny bundle. The mutation table is tests/hostile_delta_mutations.py.
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
from tests.hostile_delta_mutations import CODECS, MUTATIONS

BASE = "ab" * 32
METHOD = {"name": "lora", "config": {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "v_proj"], "use_rslora": False,
                                     "dropout": 0.0, "seed": 0}}
PREFIX = "base_model.model.model.layers.0.self_attn."
TRAINABLE = (("q.A", PREFIX + "q_proj.lora_A.weight", (4, 16)), ("q.B", PREFIX + "q_proj.lora_B.weight", (16, 4)),
             ("v.A", PREFIX + "v_proj.lora_A.weight", (4, 16)), ("v.B", PREFIX + "v_proj.lora_B.weight", (8, 4)))
TARGET = AdapterTarget(BASE, METHOD, TRAINABLE)


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
