"""SIGKILL the collector during uploads and during aggregation; after a restart every acknowledged
update is there exactly once, and the round state is consistent."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid

import numpy as np
import pytest

from tests.collector_helpers import Server, device_update, get_global, make_store, upload

httpx = pytest.importorskip("httpx")


def _stored(store):
    from edgetune.federated.store import Store

    s = Store(store)
    try:
        return s.rounds(), s.all_updates(), {r.update_id: s.read_blob(r.blob) for r in s.all_updates()}
    finally:
        s.close()


def test_kill_during_uploads(tiny_bundle, tmp_path):
    devices = [f"dev-{i}" for i in range(12)]
    store = tmp_path / "fleet"
    tokens = make_store(tiny_bundle, store, devices)
    server = Server(store, "--min-updates", "1000").start()
    glob = get_global(server.url, 0)
    rng = np.random.default_rng(0)
    bodies = {d: (str(uuid.uuid4()), device_update(glob, rng)) for d in devices}
    acked, lock = {}, threading.Lock()

    def send(d):
        update_id, body = bodies[d]
        try:
            r = upload(server.url, 0, body, device=d, token=tokens[d], update_id=update_id, timeout=20)
        except httpx.HTTPError:
            return  # killed before it answered: not acknowledged
        if r.status_code in (200, 201):
            with lock:
                acked[d] = r.json()

    threads = [threading.Thread(target=send, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    server.kill()  # SIGKILL with uploads in flight
    for t in threads:
        t.join(timeout=30)
    assert 4 <= len(acked) <= len(devices)
    rounds, updates, blobs = _stored(store)
    ids = [u.update_id for u in updates]
    assert len(ids) == len(set(ids))
    for d, answer in acked.items():  # every acknowledged update is stored, exactly once, with its bytes
        update_id, body = bodies[d]
        assert ids.count(update_id) == 1 and blobs[update_id] == body and answer["update_id"] == update_id
    assert [r.round for r in rounds] == [0] and rounds[0].closed_at is None
    # restart; the devices retry with the same ids and bytes: acknowledged ones get their first answer back
    with Server(store, "--min-updates", "1000") as again:
        for d in devices:
            update_id, body = bodies[d]
            r = upload(again.url, 0, body, device=d, token=tokens[d], update_id=update_id)
            assert r.status_code in (200, 201), r.text
            if d in acked:
                assert r.status_code == 200 and r.json() == acked[d]
        assert httpx.get(again.url + "/v1/round").json()["accepted"] == len(devices)
    _, updates, _ = _stored(store)
    assert sorted(u.update_id for u in updates) == sorted(u for u, _ in bodies.values())


def test_kill_during_aggregation(tiny_bundle, tmp_path):
    from edgetune.federated.collector import PAUSE_ENV

    devices = ["a", "b", "c"]
    store = tmp_path / "fleet"
    tokens = make_store(tiny_bundle, store, devices)
    server = Server(store, "--min-updates", "3", env={PAUSE_ENV: "30"}).start()
    glob = get_global(server.url, 0)
    rng = np.random.default_rng(1)
    sent = {}
    for d in devices:
        update_id, body = str(uuid.uuid4()), device_update(glob, rng)
        assert upload(server.url, 0, body, device=d, token=tokens[d], update_id=update_id).status_code == 201
        sent[update_id] = body
    blobs_before = {p.name for p in (store / "blobs").iterdir()}
    deadline = time.monotonic() + 30  # the aggregate's blob is written, its round commit is pausing
    while {p.name for p in (store / "blobs").iterdir()} == blobs_before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert {p.name for p in (store / "blobs").iterdir()} != blobs_before, server.output()
    server.kill()
    rounds, updates, blobs = _stored(store)
    assert [r.round for r in rounds] == [0] and rounds[0].closed_at is None  # nothing half-committed
    assert {u.update_id: blobs[u.update_id] for u in updates} == sent
    with Server(store, "--min-updates", "3") as again:  # the due round is aggregated on start
        deadline = time.monotonic() + 30
        while httpx.get(again.url + "/v1/round").json()["round"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        new = get_global(again.url, 1)
    rounds, updates, _ = _stored(store)
    assert [r.round for r in rounds] == [0, 1] and rounds[0].closed_at and rounds[1].closed_at is None
    assert sorted(rounds[0].report["update_ids"]) == sorted(sent) and len(updates) == 3
    from edgetune.delta import read_delta

    admitted = [read_delta(b) for b in sent.values()]
    total = sum(d.num_examples for d in admitted)
    mean_products = {}
    for d in admitted:
        for a in (k for k in d.tensors if ".lora_A." in k):
            b = a.replace(".lora_A.", ".lora_B.")
            mean_products[a] = mean_products.get(a, 0) + d.tensors[b].astype(np.float64) @ d.tensors[a] * d.num_examples / total
    rank = new.method["config"]["rank"]
    for a, p in mean_products.items():
        u, s, vt = np.linalg.svd(p)
        got = new.tensors[a.replace(".lora_A.", ".lora_B.")].astype(np.float64) @ new.tensors[a]
        np.testing.assert_allclose(got, (u[:, :rank] * s[:rank]) @ vt[:rank], atol=1e-5)
    assert hashlib.sha256((store / "blobs" / f"{rounds[1].global_blob}.etd").read_bytes()).hexdigest() == rounds[1].global_blob
