"""The .etd container and codecs, without a model: exactness, bounds, tampering, signatures, atomicity."""

from __future__ import annotations

import os

import numpy as np
import pytest

from edgetune.delta import check_compatible, diff, apply_diff, encode_delta, generate_keypair, load_private_key, \
    load_public_keys, read_delta, write_delta
from edgetune.errors import DeltaError

METHOD = {"name": "lora", "config": {"rank": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"], "use_rslora": False,
                                     "dropout": 0.0, "seed": 0}}
BASE = "ab" * 32


def _tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {"layers.0.q.lora_A.weight": rng.normal(0, 0.02, (8, 64)).astype(np.float32),
            "layers.0.q.lora_B.weight": rng.normal(0, 0.01, (64, 8)).astype(np.float32),
            "layers.0.v.lora_B.weight": np.zeros((16, 8), np.float32)}


def _encode(tensors=None, **kw):
    return encode_delta(tensors or _tensors(), base_model_sha256=BASE, method=METHOD, **{"codec": "fp32", **kw})


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8"])
def test_codec_round_trip_within_stated_bounds(codec):
    tensors = _tensors()
    delta = read_delta(_encode(tensors, codec=codec))
    for name, x in tensors.items():
        y = delta.tensors[name]
        assert y.dtype == np.float32 and y.shape == x.shape
        if codec == "fp32":
            np.testing.assert_array_equal(y, x)  # bit-exact
        elif codec == "fp16":
            assert np.abs(y - x).max() <= 1e-3 * max(np.abs(x).max(), 1e-12)  # stated: rel 1e-3 of the largest value
        else:  # stated: every value within half a step of its row's scale
            rows = x.reshape(x.shape[0], -1)
            half_step = (np.abs(rows).max(axis=1) / 127 / 2 * 1.001)[:, None] + 1e-9  # fp16 scale, rounded up
            assert (np.abs(y.reshape(rows.shape) - rows) <= half_step).all()
        recorded = next(t for t in delta.header["tensors"] if t["name"] == name)["error"]
        assert recorded["max_abs"] == pytest.approx(float(np.abs(y - x).max()), abs=1e-9)


def test_int8_payload_is_one_byte_a_value_plus_fp16_row_scales():
    tensors = _tensors()
    fp32, int8 = (read_delta(_encode(codec=c)) for c in ("fp32", "int8"))
    values, rows = sum(x.size for x in tensors.values()), sum(x.shape[0] for x in tensors.values())
    assert sum(fp32.payload_sizes.values()) == 4 * values
    assert sum(int8.payload_sizes.values()) == values + 2 * rows


def test_truncated_file_is_refused():
    data = _encode()
    for cut in (5, 30, len(data) // 2, len(data) - 1):
        with pytest.raises(DeltaError, match="truncated|checksum|magic"):
            read_delta(data[:cut])


def test_every_flipped_byte_is_refused():
    data = _encode()
    for i in range(0, len(data), max(1, len(data) // 97)):  # ~100 positions over magic, header, payload, checksum
        bad = bytearray(data)
        bad[i] ^= 0x40
        with pytest.raises(DeltaError):
            read_delta(bytes(bad))


def test_signatures(tmp_path):
    generate_keypair(tmp_path / "k")
    generate_keypair(tmp_path / "other")
    signed = _encode(signing_key=load_private_key(tmp_path / "k"))
    trusted = load_public_keys([tmp_path / "k.pub"])
    d = read_delta(signed, trusted_keys=trusted, require_signature=True)
    assert d.signature_status == "valid, trusted key" and d.signer_fingerprint in trusted
    bad = bytearray(signed)
    bad[-10] ^= 1  # inside the signature
    with pytest.raises(DeltaError, match="bad signature"):
        read_delta(bytes(bad))
    with pytest.raises(DeltaError, match="unknown key"):
        read_delta(signed, trusted_keys=load_public_keys([tmp_path / "other.pub"]))
    with pytest.raises(DeltaError, match="not signed"):
        read_delta(_encode(), trusted_keys=trusted, require_signature=True)
    with pytest.raises(DeltaError, match="already exists"):
        generate_keypair(tmp_path / "k")
    assert oct(os.stat(tmp_path / "k").st_mode & 0o777) == "0o600"


def test_nan_is_refused():
    t = _tensors()
    t["layers.0.q.lora_A.weight"][0, 0] = np.nan
    with pytest.raises(DeltaError, match="NaN or Inf values in layers.0.q.lora_A.weight"):
        _encode(t)


def test_check_compatible_reports_every_problem_at_once():
    d = read_delta(_encode())
    shapes = {k: v.shape for k, v in _tensors().items()}
    shapes["layers.0.q.lora_B.weight"] = (32, 8)
    other = {**METHOD, "config": {**METHOD["config"], "rank": 16}}
    with pytest.raises(DeltaError) as err:
        check_compatible(d, base_model_sha256="cd" * 32, method=other, expected_shapes=shapes)
    msg = str(err.value)
    assert "abababab" in msg and "cdcdcdcd" in msg and "rank 8 != the bundle's 16" in msg and "(32, 8)" in msg
    check_compatible(d, base_model_sha256=BASE, method=METHOD, expected_shapes={k: v.shape for k, v in _tensors().items()})


def test_diff_round_trip():
    a, b = _tensors(0), _tensors(1)
    d = read_delta(_encode(diff(a, b), kind="diff", since_sha256="ef" * 32))
    rebuilt = apply_diff(b, d.tensors)
    for k in a:
        np.testing.assert_allclose(rebuilt[k], a[k], rtol=0, atol=1e-7)


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import errno

    target = tmp_path / "u.etd"
    write_delta(target, _tensors(), base_model_sha256=BASE, method=METHOD, codec="fp16")
    before = target.read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(DeltaError, match="disk is full .* nothing was written"):
        write_delta(target, _tensors(1), base_model_sha256=BASE, method=METHOD, codec="fp32")
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["u.etd"]
