"""The .etd container and codecs, without a model: exactness, bounds, tampering, signatures, atomicity.

Stated bounds checked here (also in docs/delta-format.md):
    fp32  bit-exact
    fp16  |x' - x| <= 2^-11 |x| + 2^-25 per value
    int8  |x' - x| <= scale_r / 2 per value, scale_r = the row's stored scale ~= max|row| / 127
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import subprocess
import sys
from datetime import datetime

import numpy as np
import pytest

from edgetune.delta import (apply_diff, check_compatible, diff, encode_delta, fingerprint, generate_keypair,
                            load_private_key, load_public_keys, read_delta, write_delta)
from edgetune.delta import codecs
from edgetune.delta.signing import raw_public
from edgetune.errors import DeltaError

METHOD = {"name": "lora", "config": {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"], "use_rslora": False,
                                     "dropout": 0.0, "seed": 0}}
BASE = "ab" * 32
A, B, V = "layers.0.q.lora_A.weight", "layers.0.q.lora_B.weight", "layers.0.v.lora_B.weight"


def _tensors(seed=0, scale=1.0):
    """LoRA-shaped: A (r=8, in=64), B (out=64, r=8), and an untrained all-zero B (16, 8)."""
    rng = np.random.default_rng(seed)
    return {A: (scale * rng.normal(0, 0.02, (8, 64))).astype(np.float32),
            B: (scale * rng.normal(0, 0.01, (64, 8))).astype(np.float32),
            V: np.zeros((16, 8), np.float32)}


def _encode(tensors=None, **kw):
    return encode_delta(_tensors() if tensors is None else tensors, base_model_sha256=BASE, method=METHOD,
                        **{"codec": "fp32", **kw})


def _repack(header, payload: bytes, version: int = 1) -> bytes:
    """A file with a valid checksum around any header/payload: tests what the reader checks after it."""
    head = header if isinstance(header, bytes) else json.dumps(header, sort_keys=True).encode()
    blob = b"ETDELTA\0" + struct.pack("<IQ", version, len(head)) + head + struct.pack("<Q", len(payload)) + payload
    return blob + hashlib.sha256(blob).digest()


def _parts(data: bytes):
    """(header dict, payload bytes, start of header, start of payload) of an unsigned file."""
    (n,) = struct.unpack_from("<Q", data, 12)
    (m,) = struct.unpack_from("<Q", data, 20 + n)
    return json.loads(data[20:20 + n]), data[28 + n:28 + n + m], 20, 28 + n


# --- codecs ------------------------------------------------------------------------------------

EDGE = {"lora_A": np.random.default_rng(1).normal(0, 0.02, (8, 64)),
        "lora_B": np.random.default_rng(2).normal(0, 0.01, (64, 8)),
        "zero_row": np.vstack([np.zeros((1, 8)), np.random.default_rng(3).normal(0, 1, (3, 8))]),
        "tiny_rows": np.random.default_rng(4).normal(0, 1e-7, (4, 8)),  # int8 falls back to fp32 scales
        "huge_rows": np.random.default_rng(5).normal(0, 1e9, (4, 8)),
        "one_d": np.linspace(-1, 1, 7), "scalar": np.array(0.25), "three_d": np.arange(24.0).reshape(2, 3, 4),
        "no_rows": np.zeros((0, 8)), "no_cols": np.zeros((8, 0))}


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("name", sorted(EDGE))
def test_codec_error_within_stated_bound(codec, name):
    x = EDGE[name].astype(np.float32)
    if codec == "fp16" and name == "huge_rows":
        with pytest.raises(DeltaError, match="huge_rows: values up to .* do not fit float16.*use codec int8 or fp32"):
            codecs.encode(name, x, codec)
        return
    entries = codecs.encode(name, x, codec)
    y = codecs.decode(name, entries, codec)
    assert y.dtype == np.float32 and y.shape == x.shape
    err = np.abs(y.astype(np.float64) - x)
    if codec == "fp32":
        np.testing.assert_array_equal(y, x)
    elif codec == "fp16":
        assert (err <= 2.0 ** -11 * np.abs(x) + 2.0 ** -25).all()
    else:
        scale = entries[name + codecs.SCALE_SUFFIX].astype(np.float64)  # (rows,)
        rows = err.reshape(scale.shape[0], err.size // max(scale.shape[0], 1))  # (rows, cols); 0/1-D: one row
        assert (rows <= scale[:, None] / 2 * (1 + 1e-6)).all()
        ideal = np.abs(x.reshape(rows.shape)).max(axis=1, initial=0) / 127
        nonzero = ideal > 0
        assert (scale[nonzero] <= ideal[nonzero] * (1 + 1 / 64) + 1e-45).all()  # scales stay near max|row| / 127


def test_int8_scales_are_fp16_for_lora_values_and_fp32_where_fp16_would_lose_resolution():
    assert codecs.encode("b", EDGE["lora_B"], "int8")["b.__scale__"].dtype == np.float16
    for name in ("tiny_rows", "huge_rows"):
        assert codecs.encode(name, EDGE[name], "int8")[name + ".__scale__"].dtype == np.float32
    zero = codecs.encode("z", np.zeros((3, 4)), "int8")
    assert (zero["z.__scale__"] == 1).all() and (codecs.decode("z", zero, "int8") == 0).all()


def test_int8_payload_is_about_a_quarter_of_fp32():
    tensors = _tensors()
    fp32, int8 = (read_delta(_encode(codec=c)) for c in ("fp32", "int8"))
    values, rows = sum(x.size for x in tensors.values()), sum(x.shape[0] for x in tensors.values())
    assert sum(fp32.payload_sizes.values()) == 4 * values
    assert sum(int8.payload_sizes.values()) == values + 2 * rows  # 1 byte a value + one fp16 scale a row
    assert sum(int8.payload_sizes.values()) / sum(fp32.payload_sizes.values()) < 0.33  # r = 8 rows cost a bit
    square = codecs.encode("w", np.ones((64, 64), np.float32), "int8")
    assert sum(a.nbytes for a in square.values()) / (4 * 64 * 64) == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8"])
def test_file_round_trip_records_the_measured_error(codec):
    tensors = _tensors()
    delta = read_delta(_encode(tensors, codec=codec))
    for name, x in tensors.items():
        recorded = next(t for t in delta.tensor_info if t["name"] == name)["error"]
        assert recorded["max_abs"] == pytest.approx(float(np.abs(delta.tensors[name] - x).max()), abs=1e-12)
    assert delta.codec == codec and delta.kind == "full" and delta.base_model_sha256 == BASE


def test_unknown_codec_is_refused():
    with pytest.raises(DeltaError, match="unknown codec 'int4'.*fp32, fp16, int8"):
        _encode(codec="int4")


# --- encoding refusals -------------------------------------------------------------------------

def test_nan_and_inf_are_refused_naming_every_tensor():
    t = _tensors()
    t[A][0, 0], t[B][3, 1] = np.nan, np.inf
    with pytest.raises(DeltaError) as err:
        _encode(t)
    assert f"{A}: NaN or Inf" in str(err.value) and f"{B}: NaN or Inf" in str(err.value)


def test_bad_arguments_are_reported_together():
    with pytest.raises(DeltaError) as err:
        encode_delta(_tensors(), base_model_sha256="nothex", method=METHOD, codec="fp16", kind="diff",
                     num_examples=-1, metrics={"loss": float("nan")})
    msg = str(err.value)
    for part in ("`base_model_sha256` must be 64 lowercase hex digits, got 'nothex'", "a diff needs `since_sha256`",
                 "`num_examples` must be a whole number >= 0, got -1", "metric 'loss' must be a finite number"):
        assert part in msg


# --- reading refusals --------------------------------------------------------------------------

def test_header_and_metadata():
    data = _encode(num_examples=12, round_id="r7", metrics={"loss": 0.5}, producer={"device": "pi5"})
    header, _, _, _ = _parts(data)
    d = read_delta(data)
    assert d.header == header and list(header) == sorted(header)
    assert d.num_examples == 12 and d.round_id == "r7" and d.metrics == {"loss": 0.5} and d.since_sha256 is None
    assert d.producer["device"] == "pi5" and "edgetune" in d.producer
    assert datetime.fromisoformat(d.created_at).utcoffset().total_seconds() == 0
    assert d.sha256 == hashlib.sha256(data[:-32]).hexdigest() and d.size == len(data)


def test_every_truncation_is_refused():
    data = _encode(_tensors(), codec="int8")
    for cut in range(len(data)):
        with pytest.raises(DeltaError, match="truncated|checksum"):
            read_delta(data[:cut])


def test_every_flipped_byte_is_refused():
    data = _encode(codec="int8")
    _, payload, head_start, body_start = _parts(data)
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        in_content = head_start <= i < body_start - 8 or body_start <= i < body_start + len(payload)
        with pytest.raises(DeltaError, match="file is corrupt or was modified: checksum" if in_content else None):
            read_delta(bytes(bad))


@pytest.mark.parametrize("data, message", [
    (b"PK\x03\x04" + bytes(60), "not an edgetune delta"),
    (_repack({}, b"", version=2), "format version 2 is not supported"),
    (_repack(b"{not json", b""), "header is not UTF-8 JSON"),
    (_repack({"format_version": 1}, b""), "bad header: `base_model_sha256` missing"),
])
def test_wrong_magic_version_or_header_is_refused(data, message):
    with pytest.raises(DeltaError, match=message):
        read_delta(data)


def _tampered(change):
    """Re-checksummed file whose header/payload were changed by ``change(header, entries)``."""
    from safetensors.numpy import load, save

    header, payload, _, _ = _parts(_encode())
    entries = load(payload)
    change(header, entries)
    return _repack(header, save(entries))


@pytest.mark.parametrize("change, message", [
    (lambda h, e: e.__setitem__(A, np.full((8, 64), np.nan, np.float32)), f"NaN or Inf values in 1 tensor.*: {A}"),
    (lambda h, e: h["tensors"][0].__setitem__("shape", [64, 8]), "payload shape \\[8, 64\\] != header shape"),
    (lambda h, e: e.pop(B), f"{B}: payload entry .* is missing"),
    (lambda h, e: e.__setitem__("extra", np.zeros(2, np.float32)), "payload entries not in the header: extra"),
    (lambda h, e: e.__setitem__(A, e[A].astype(np.float64)), "dtype float64, expected float32"),
    (lambda h, e: h["tensors"][0].__setitem__("codec", "zstd"), "tensor entry 0 .* codec this edgetune does not know"),
])
def test_a_checksummed_but_inconsistent_file_is_refused(change, message):
    with pytest.raises(DeltaError, match=message):
        read_delta(_tampered(change))


def test_reading_a_missing_file_names_it(tmp_path):
    with pytest.raises(DeltaError, match="nope.etd: cannot read it"):
        read_delta(tmp_path / "nope.etd")


# --- signatures --------------------------------------------------------------------------------

@pytest.fixture
def keys(tmp_path):
    for name in ("k", "other"):
        generate_keypair(tmp_path / name)
    return tmp_path


def test_signed_delta_verifies(keys):
    signed = _encode(signing_key=load_private_key(keys / "k"))
    trusted = load_public_keys([keys / "k.pub"])
    assert read_delta(signed).signature_status == "valid"
    d = read_delta(signed, trusted_keys=trusted, require_signature=True)
    assert d.signature_status == "valid, trusted key" and list(trusted) == [d.signer_fingerprint]
    assert d.signer_fingerprint == fingerprint(load_private_key(keys / "k").public_key())
    assert d.sha256 == hashlib.sha256(signed[:-130]).hexdigest()  # the checksum excludes the 98-byte signature block


def test_changing_any_byte_of_a_signed_delta_fails(keys):
    signed = _encode(_tensors(), codec="int8", signing_key=load_private_key(keys / "k"))
    trusted = load_public_keys([keys / "k.pub"])
    for i in range(len(signed)):
        bad = bytearray(signed)
        bad[i] ^= 0x80
        with pytest.raises(DeltaError, match="bad signature" if i >= len(signed) - 96 else None):
            read_delta(bytes(bad), trusted_keys=trusted, require_signature=True)


def test_untrusted_or_missing_signatures_are_refused(keys):
    signed = _encode(signing_key=load_private_key(keys / "other"))
    other = fingerprint(load_private_key(keys / "other").public_key())
    trusted = load_public_keys([keys / "k.pub"])
    with pytest.raises(DeltaError, match=f"signed by unknown key {other}"):
        read_delta(signed, trusted_keys=trusted)
    forged = {other: next(iter(trusted.values()))}  # the right fingerprint for another key is not enough
    with pytest.raises(DeltaError, match="unknown key"):
        read_delta(signed, trusted_keys=forged)
    with pytest.raises(DeltaError, match="not signed, but a signature by a trusted key is required"):
        read_delta(signed[:-98], trusted_keys=trusted, require_signature=True)  # signature stripped
    with pytest.raises(DeltaError, match="signature block is malformed"):
        read_delta(signed[:-1])


def test_key_files(keys):
    assert oct(os.stat(keys / "k").st_mode & 0o777) == "0o600"
    assert (keys / "k.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    with pytest.raises(DeltaError, match="k already exists; choose another --out"):
        generate_keypair(keys / "k")
    raw = load_public_keys([keys / "k.pub"])
    (keys / "hex.pub").write_text(raw_public(next(iter(raw.values()))).hex() + "\n")  # 64 hex digits also load
    assert load_public_keys([keys / "hex.pub"]).keys() == raw.keys()
    (keys / "junk.pub").write_text("hello")
    with pytest.raises(DeltaError) as err:  # every bad file in one message
        load_public_keys([keys / "junk.pub", keys / "k", keys / "missing.pub"])
    assert all(s in str(err.value) for s in ("3 trusted key file(s)", "junk.pub: not a readable public key",
                                             "this is a private key", "missing.pub: cannot read"))
    with pytest.raises(DeltaError, match="k.pub: this is a public key"):
        load_private_key(keys / "k.pub")


# --- compatibility and diffs -------------------------------------------------------------------

def test_check_compatible_reports_every_problem_at_once():
    d = read_delta(_encode())
    shapes = {k: v.shape for k, v in _tensors().items()}
    shapes[B] = (32, 8)
    shapes["layers.1.q.lora_A.weight"] = (8, 64)
    other = {**METHOD, "config": {**METHOD["config"], "rank": 16}}
    with pytest.raises(DeltaError) as err:
        check_compatible(d, base_model_sha256="cd" * 32, method=other, expected_shapes=shapes)
    msg = str(err.value)
    assert "abababab" in msg and "cdcdcdcd" in msg and "rank 8 != the bundle's 16" in msg and "(32, 8)" in msg
    assert "layers.1.q.lora_A.weight" in msg
    check_compatible(d, base_model_sha256=BASE, method=METHOD, expected_shapes={k: v.shape for k, v in _tensors().items()})


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_diff_round_trip(codec):
    current, reference = _tensors(0), _tensors(1)
    largest = max(float(np.abs(current[k] - reference[k]).max()) for k in current)
    atol = 1e-7 if codec == "fp32" else 1e-7 + largest / 127 / 2 * (1 + 1 / 64)  # int8: half a step of the row scale
    since = read_delta(_encode(reference)).sha256
    d = read_delta(_encode(diff(current, reference), codec=codec, kind="diff", since_sha256=since))
    assert d.kind == "diff" and d.since_sha256 == since
    rebuilt = apply_diff(reference, d.tensors)
    for k in current:
        np.testing.assert_allclose(rebuilt[k], current[k], rtol=0, atol=atol)
    with pytest.raises(DeltaError):
        apply_diff({**reference, A: np.zeros((8, 32), np.float32)}, d.tensors)


# --- atomic writes -----------------------------------------------------------------------------

def _fail(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize("patched, code, message", [
    ("replace", errno.ENOSPC, "the disk is full: cannot write .*u.etd; nothing was written"),
    ("fsync", errno.EIO, "cannot write .*u.etd: Input/output error; nothing was written"),
    ("fsync", errno.EDQUOT, "the disk is full"),
])
def test_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch, patched, code, message):
    target = tmp_path / "u.etd"
    write_delta(target, _tensors(), base_model_sha256=BASE, method=METHOD, codec="fp16")
    before = target.read_bytes()
    monkeypatch.setattr(os, patched, _fail(code))
    with pytest.raises(DeltaError, match=message):
        write_delta(target, _tensors(1), base_model_sha256=BASE, method=METHOD, codec="fp32")
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["u.etd"]
    monkeypatch.undo()
    new = tmp_path / "new.etd"
    monkeypatch.setattr(os, patched, _fail(code))
    with pytest.raises(DeltaError):
        write_delta(new, _tensors(1), base_model_sha256=BASE, method=METHOD, codec="fp32")
    assert not new.exists() and [p.name for p in tmp_path.iterdir()] == ["u.etd"]


def test_write_into_a_missing_folder_and_file_mode(tmp_path):
    with pytest.raises(DeltaError, match="folder .*nowhere does not exist; nothing was written"):
        write_delta(tmp_path / "nowhere" / "u.etd", _tensors(), base_model_sha256=BASE, method=METHOD)
    old = os.umask(0o022)
    try:
        size = write_delta(tmp_path / "u.etd", _tensors(), base_model_sha256=BASE, method=METHOD, codec="int8")
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "u.etd").st_mode & 0o777) == "0o644" and size == (tmp_path / "u.etd").stat().st_size
    assert read_delta(tmp_path / "u.etd").codec == "int8"


def test_the_delta_package_never_imports_heavy_frameworks():
    code = ("import sys, numpy as np, edgetune.delta as d\n"
            "b = d.encode_delta({'a': np.ones((2, 2), np.float32)}, base_model_sha256='0' * 64,"
            " method={'name': 'lora', 'config': {}}, codec='int8')\n"
            "d.read_delta(b)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'optimum') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- PEFT folders are replaced atomically ------------------------------------------------------

def _peft_manifest():
    from types import SimpleNamespace

    return SimpleNamespace(method={"name": "lora", "config": {"rank": 8}, "peft_config": {"peft_type": "LORA", "r": 8}},
                           base_sha256=BASE)


def _write_peft(folder, tensors, force=False):
    from edgetune.peft_io import write_peft_adapter

    write_peft_adapter(folder, _peft_manifest(), tensors, force=force)


def _peft_tensors(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("exchange", [True, False], ids=["one-step swap", "rename aside"])
def test_peft_folder_replace_keeps_the_old_folder_until_the_new_one_is_in(tmp_path, monkeypatch, exchange):
    from edgetune import atomic

    if not exchange:
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    out = tmp_path / "peft"
    _write_peft(out, {A: np.ones((2, 2), np.float32)})
    with pytest.raises(DeltaError, match="already exists; pass --force"):
        _write_peft(out, {A: np.zeros((2, 2), np.float32)})
    _write_peft(out, {A: np.full((2, 2), 2.0, np.float32)}, force=True)
    assert (_peft_tensors(out)[A] == 2).all() and sorted(p.name for p in tmp_path.iterdir()) == ["peft"]

    real_rename = os.rename

    def failing_rename(src, dst):  # the step that puts the new folder in place fails
        if str(dst) == str(out) and ".partial" in str(src):
            raise OSError(errno.EIO, "I/O error", str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(atomic, "exchange", lambda a, b: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    monkeypatch.setattr(atomic.os, "rename", failing_rename)
    with pytest.raises(DeltaError, match="cannot write .*peft: I/O error; nothing was changed there"):
        _write_peft(out, {A: np.full((2, 2), 3.0, np.float32)}, force=True)
    assert (_peft_tensors(out)[A] == 2).all()  # the old folder, whole, under its name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]  # no temp or aside folder left


def test_peft_folder_swap_never_leaves_the_path_empty(tmp_path, monkeypatch):
    """During the rename-aside fallback, a failure after moving the old folder aside restores it."""
    from edgetune import atomic

    out = tmp_path / "peft"
    _write_peft(out, {A: np.ones((2, 2), np.float32)})
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    real_rename, seen = os.rename, []

    def interrupted(src, dst):
        seen.append((os.path.exists(out), str(dst)))
        if str(dst) == str(out) and ".partial" in str(src):
            raise KeyboardInterrupt  # e.g. Ctrl-C between the two renames
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _write_peft(out, {A: np.zeros((2, 2), np.float32)}, force=True)
    assert (_peft_tensors(out)[A] == 1).all() and sorted(p.name for p in tmp_path.iterdir()) == ["peft"]
    assert seen[0][0] and ".old-" in seen[0][1]  # first the old folder went aside, whole
    assert len(seen) == 3 and seen[2][1] == str(out)  # then the new one failed, and the old came back


def test_a_peft_folder_left_aside_by_a_killed_write_is_put_back(tmp_path):
    out = tmp_path / "peft"
    _write_peft(out, {A: np.ones((2, 2), np.float32)})
    os.rename(out, tmp_path / ".peft.old-1")  # what a kill between the two renames of the fallback leaves
    with pytest.raises(DeltaError, match="already exists; pass --force"):  # the old folder is back, not lost
        _write_peft(out, {A: np.zeros((2, 2), np.float32)})
    assert (_peft_tensors(out)[A] == 1).all() and sorted(p.name for p in tmp_path.iterdir()) == ["peft"]


def test_peft_output_that_is_a_file_or_link_is_not_replaced(tmp_path):
    (tmp_path / "file").write_text("keep me")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    for name in ("file", "link"):
        with pytest.raises(DeltaError, match="exists and is not a folder"):
            _write_peft(tmp_path / name, {A: np.ones((2, 2), np.float32)}, force=True)
    assert (tmp_path / "file").read_text() == "keep me" and (tmp_path / "link").is_symlink()


def test_a_delta_with_a_zero_length_axis_is_not_written():
    with pytest.raises(DeltaError, match="cannot write the delta: .*`shape` must be a list of positive whole numbers"):
        _encode({A: np.zeros((0, 8), np.float32)})


# --- resolve_delta: the one path from a delta file to a bundle's adapter -----------------------

def test_resolve_delta_fits_applies_diffs_and_maps_graph_names(keys):
    from edgetune.delta import AdapterTarget, resolve_delta

    target = AdapterTarget(BASE, METHOD, [(f"graph.{k}", k, v.shape) for k, v in _tensors().items()])
    reference, current = _tensors(1), _tensors(2)
    global_delta = _encode(reference)
    since = read_delta(global_delta).sha256
    update = _encode(diff(current, reference), kind="diff", since_sha256=since,
                     signing_key=load_private_key(keys / "k"))
    trusted = load_public_keys([keys / "k.pub"])
    resolved = resolve_delta(update, target, since=global_delta, trusted_keys=trusted)
    for k in current:
        np.testing.assert_allclose(resolved.by_peft[k], current[k], atol=1e-7)
        assert resolved.by_graph[f"graph.{k}"] is resolved.by_peft[k]
    assert resolved.reference.sha256 == since and resolved.delta.signature_status == "valid, trusted key"
    with pytest.raises(DeltaError, match="is a difference from delta .*pass --since"):
        resolve_delta(update, target)
    with pytest.raises(DeltaError, match="--since the delta has checksum .* was made against"):
        resolve_delta(update, target, since=_encode(current))
    with pytest.raises(DeltaError, match="signed by unknown key"):  # an empty trusted set trusts nobody
        resolve_delta(update, target, since=global_delta, trusted_keys={})
    with pytest.raises(DeltaError, match="not signed, but a signature by a trusted key is required"):
        resolve_delta(global_delta, target, trusted_keys=trusted)
    other = AdapterTarget("cd" * 32, METHOD, target.trainable)
    with pytest.raises(DeltaError, match="does not fit this bundle: it was trained on base model abab"):
        resolve_delta(global_delta, other)
