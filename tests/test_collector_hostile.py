"""Hostile input against a running collector: each request is refused with its status and reason, the
server keeps serving, and nothing it stores (rounds, updates, blobs) changes."""

from __future__ import annotations

import hashlib
import socket
import struct
import time
import uuid

import numpy as np
import pytest

from tests.collector_helpers import (Server, cli, device_update, get_global, make_store, replace_header, reseal,
                                     upload)

httpx = pytest.importorskip("httpx")
CAP = 64 * 1024


@pytest.fixture(scope="module")
def running(tiny_bundle, tmp_path_factory):
    """A server with one accepted token update and one accepted signed update in round 0."""
    from edgetune.delta import generate_keypair, load_private_key

    tmp = tmp_path_factory.mktemp("hostile")
    store = tmp / "fleet"
    tokens = make_store(tiny_bundle, store, ["good", "other"])
    generate_keypair(tmp / "signer.key")
    generate_keypair(tmp / "stranger.key")
    r = cli("collect", "devices", "add", "signer", "--store", store, "--public-key", tmp / "signer.key.pub")
    assert r.returncode == 0, r.stderr
    server = Server(store, "--min-updates", "100", "--max-upload-bytes", CAP, "--upload-timeout", "1.5",
                    "--max-norm", "50", "--norm-policy", "refuse").start()
    glob = get_global(server.url, 0)
    rng = np.random.default_rng(0)
    first = device_update(glob, rng)
    first_id = str(uuid.uuid4())
    r = upload(server.url, 0, first, device="good", token=tokens["good"], update_id=first_id)
    assert r.status_code == 201, r.text
    signed = device_update(glob, rng, signing_key=load_private_key(tmp / "signer.key"))
    assert upload(server.url, 0, signed, device="signer").status_code == 201
    ctx = dict(server=server, store=store, tokens=tokens, glob=glob, rng=rng, first=first, first_id=first_id,
               first_answer=r.json(), signer=load_private_key(tmp / "signer.key"),
               stranger=load_private_key(tmp / "stranger.key"))
    yield ctx
    server.stop()


def _snapshot(store) -> tuple:
    import sqlite3

    db = sqlite3.connect(f"file:{store / 'collector.sqlite'}?mode=ro", uri=True)
    rows = (db.execute("SELECT * FROM rounds ORDER BY round").fetchall(),
            db.execute("SELECT * FROM updates ORDER BY update_id").fetchall())
    db.close()
    blobs = sorted((p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in (store / "blobs").iterdir())
    return rows, blobs


def _nan_delta(glob) -> bytes:
    from edgetune.delta import encode_delta

    tensors = {k: v.copy() for k, v in glob.tensors.items()}
    first = sorted(tensors)[0]
    tensors[first].flat[0] = 12345.5  # a sentinel to overwrite with NaN bytes in the fp32 payload
    data = encode_delta(tensors, base_model_sha256=glob.base_model_sha256, method=glob.method, codec="fp32",
                        num_examples=3)
    sentinel = struct.pack("<f", 12345.5)
    assert data.count(sentinel) == 1
    return reseal(data.replace(sentinel, struct.pack("<f", float("nan"))))


def _cases(c):
    """(name, request kwargs, expected status, expected reason)."""
    from edgetune.delta import encode_delta

    glob, rng, tok = c["glob"], c["rng"], c["tokens"]["other"]
    good = device_update(glob, rng)
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0x10
    wrong_shapes = {k: np.zeros((v.shape[0] + 1, *v.shape[1:]), np.float32) for k, v in glob.tensors.items()}
    base = dict(base_model_sha256=glob.base_model_sha256, method=glob.method, codec="fp32", num_examples=4)
    bomb = {k: v + 1e6 for k, v in glob.tensors.items()}
    return [
        ("json body", dict(body=b'{"update": [1, 2,', content_type="application/json"), 415, "wrong_content_type"),
        ("malformed json as delta", dict(body=b'{"update": [1, 2,'), 400, "malformed"),
        ("text/plain", dict(body=good, content_type="text/plain"), 415, "wrong_content_type"),
        ("no content type", dict(body=good, content_type=""), 415, "wrong_content_type"),
        ("oversized", dict(body=b"\0" * (CAP + 1)), 413, "too_large"),
        ("oversized chunked", dict(body=(b"\0" * 4096 for _ in range(CAP // 4096 + 2))), 413, "too_large"),
        ("bit flip", dict(body=bytes(flipped)), 400, "malformed"),
        ("truncated delta", dict(body=good[:len(good) // 2]), 400, "malformed"),
        ("empty body", dict(body=b""), 400, "malformed"),
        ("header not json", dict(body=reseal(good.replace(b'"kind"', b'"kind\xff'))), 400, "malformed"),
        ("wrong base model", dict(body=encode_delta(glob.tensors, **{**base, "base_model_sha256": "0" * 64})), 422,
         "wrong_base_model"),
        ("wrong method", dict(body=replace_header(good, lambda h: {**h, "method": {**h["method"], "config": {
            **h["method"]["config"], "rank": 99}}})), 422, "wrong_method"),
        ("wrong shapes", dict(body=encode_delta(wrong_shapes, **base)), 422, "wrong_tensors"),
        ("missing tensor", dict(body=encode_delta(dict(list(glob.tensors.items())[1:]), **base)), 422, "wrong_tensors"),
        ("nan", dict(body=_nan_delta(glob)), 422, "non_finite"),
        ("norm bomb", dict(body=encode_delta(bomb, **base)), 422, "norm_too_large"),
        ("no examples", dict(body=device_update(glob, rng, examples=0)), 422, "no_examples"),
        ("wrong since", dict(body=device_update(glob, rng, kind="diff", since_sha256="ab" * 32)), 422, "wrong_since"),
        ("round id mismatch", dict(body=device_update(glob, rng, round_id="7")), 422, "round_mismatch"),
        ("future round", dict(body=good, round_=3), 409, "round_not_open"),
        ("replay, other bytes", dict(body=good, update_id=c["first_id"], device="good", token=c["tokens"]["good"]),
         409, "update_id_conflict"),
        ("second update in round", dict(body=good, device="good", token=c["tokens"]["good"]), 409, "one_per_round"),
        ("unknown device", dict(body=good, device="intruder"), 403, "unknown_device"),
        ("bad device id", dict(body=good, device="../../etc"), 400, "bad_headers"),
        ("bad update id", dict(body=good, update_id="not-a-uuid"), 400, "bad_headers"),
        ("wrong token", dict(body=good, token="x" * 43), 401, "bad_token"),
        ("other device's token", dict(body=good, token=c["tokens"]["good"]), 401, "bad_token"),
        ("basic auth", dict(body=good, raw_auth="Basic Zm9vOmJhcg=="), 401, "bad_token"),
        ("no credentials", dict(body=good, token=None), 401, "no_credentials"),
        ("unsigned from key device", dict(body=good, device="signer", token=None), 401, "unsigned"),
        ("signed by a stranger", dict(body=device_update(glob, rng, signing_key=c["stranger"]), device="signer",
                                      token=None), 403, "bad_signature"),
        ("forged signature", dict(body=_forge(device_update(glob, rng, signing_key=c["signer"])), device="signer",
                                  token=None), 403, "bad_signature"),
    ]


def _forge(data: bytes) -> bytes:
    """A signed delta whose signature bytes were altered (checksum still right)."""
    out = bytearray(data)
    out[-1] ^= 0x01
    return bytes(out)


def test_every_hostile_request_is_refused_with_its_reason(running):
    c = running
    before = _snapshot(c["store"])
    seen = {}
    for name, req, status, reason in _cases(c):
        headers = {"X-Edgetune-Device": req.get("device", "other"),
                   "X-Edgetune-Update-Id": req.get("update_id", str(uuid.uuid4()))}
        token = req.get("token", c["tokens"]["other"])
        if "raw_auth" in req:
            headers["Authorization"] = req["raw_auth"]
        elif token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if req.get("content_type", "application/octet-stream"):
            headers["Content-Type"] = req.get("content_type", "application/octet-stream")
        r = httpx.post(f"{c['server'].url}/v1/rounds/{req.get('round_', 0)}/updates", content=req["body"],
                       headers=headers, timeout=30)
        assert (r.status_code, r.json().get("reason")) == (status, reason), (name, r.text)
        message = r.json()["error"]
        assert message and "\n" not in message and "Traceback" not in message, (name, message)
        seen[reason] = seen.get(reason, 0) + 1
    assert sum(seen.values()) == len(_cases(c)) and len(seen) >= 20
    assert c["server"].alive()
    assert _snapshot(c["store"]) == before, "a refused request changed what the store holds"
    status = httpx.get(c["server"].url + "/v1/status").json()
    for reason, count in seen.items():
        assert status["refused_by_reason"].get(reason, 0) >= count, reason
    assert httpx.get(c["server"].url + "/v1/round").json()["accepted"] == 2


def test_replay_with_the_same_bytes_returns_the_first_answer(running):
    c = running
    before = _snapshot(c["store"])
    for _ in range(2):
        r = upload(c["server"].url, 0, c["first"], device="good", token=c["tokens"]["good"], update_id=c["first_id"])
        assert r.status_code == 200 and r.json() == c["first_answer"]
    assert _snapshot(c["store"]) == before


def _raw_request(url: str, headers: dict, body_part: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    lines = [f"POST /v1/rounds/0/updates HTTP/1.1", f"Host: {host}"] + [f"{k}: {v}" for k, v in headers.items()]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body_part)
    return s


def test_slow_and_vanishing_clients(running):
    """A client that stalls mid-body gets 408 after --upload-timeout while others are served; one that
    disconnects mid-body is recorded as truncated. Neither changes the store."""
    c = running
    before = _snapshot(c["store"])
    headers = {"X-Edgetune-Device": "other", "X-Edgetune-Update-Id": str(uuid.uuid4()),
               "Authorization": f"Bearer {c['tokens']['other']}", "Content-Type": "application/octet-stream",
               "Content-Length": "5000"}
    slow = _raw_request(c["server"].url, headers, b"ETDELTA\0" + b"\1" * 100)
    start = time.monotonic()
    assert httpx.get(c["server"].url + "/v1/round", timeout=5).status_code == 200  # served meanwhile
    answer = b""
    while b"\r\n\r\n" not in answer and time.monotonic() - start < 20:
        chunk = slow.recv(4096)
        if not chunk:
            break
        answer += chunk
    slow.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    gone = _raw_request(c["server"].url, {**headers, "X-Edgetune-Update-Id": str(uuid.uuid4())}, b"ETDELTA\0" * 10)
    gone.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if httpx.get(c["server"].url + "/v1/status").json()["refused_by_reason"].get("truncated_body"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the vanished client was not recorded as truncated_body")
    assert c["server"].alive() and _snapshot(c["store"]) == before


def test_unknown_routes_and_rounds_answer_json(running):
    url = running["server"].url
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/rounds/99/global", 404),
                                 ("GET", "/v1/rounds/-1/global", 404), ("DELETE", "/v1/round", 405),
                                 ("GET", "/v1/rounds/0/updates", 405)):
        r = httpx.request(method, url + path)
        assert r.status_code == status and "error" in r.json(), (path, r.text)


def test_concurrent_uploads_from_one_device_admit_exactly_one(running):
    """Eight different updates from one device at once: one is admitted, seven get 409 (runs last: it adds a row)."""
    from concurrent.futures import ThreadPoolExecutor

    c = running
    bodies = [device_update(c["glob"], c["rng"]) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: upload(c["server"].url, 0, b, device="other", token=c["tokens"]["other"]),
                                bodies))
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] + [409] * 7, [r.text for r in answers]
    assert {r.json()["reason"] for r in answers if r.status_code == 409} <= {"one_per_round"}
    assert httpx.get(c["server"].url + "/v1/round").json()["accepted"] == 3
