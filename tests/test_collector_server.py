"""End to end through a real uvicorn process: 5 devices x 2 rounds; the aggregate equals FedAvg by hand."""

from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pytest

from tests.collector_helpers import Server, cli, device_update, get_global, make_store, upload

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

DEVICES = [f"dev-{i}" for i in range(5)]


def _frozen_a_bundle(tiny_bundle, tmp_path):
    """The tiny bundle with ``freeze_a`` in its method config while its deltas still list lora_A: the
    collector aggregates tensor-wise and pins A. (A bundle whose A is not trainable at all, as
    `export --freeze-a` writes, is covered in test_collector_cli.py.)"""
    copy = tmp_path / "bundle-ffa"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / "edgetune.json").read_text())
    manifest["method"]["config"]["freeze_a"] = True
    (copy / "edgetune.json").write_text(json.dumps(manifest))
    return copy


def _fedavg_by_hand(admitted: list[tuple[dict, int]]) -> dict[str, np.ndarray]:
    total = sum(n for _, n in admitted)
    return {k: sum(t[k].astype(np.float64) * n for t, n in admitted) / total for k in admitted[0][0]}


def _products(tensors: dict) -> dict[str, np.ndarray]:
    return {a.split(".lora_A.")[0]: tensors[a.replace(".lora_A.", ".lora_B.")].astype(np.float64) @ tensors[a]
            for a in tensors if ".lora_A." in a}


@pytest.mark.parametrize("variant", ["lora-product", "frozen-a"])
def test_two_rounds_of_five_devices(tiny_bundle, tmp_path, variant):
    from edgetune.delta import read_delta

    bundle = tiny_bundle if variant == "lora-product" else _frozen_a_bundle(tiny_bundle, tmp_path)
    store = tmp_path / "fleet"
    tokens = make_store(bundle, store, DEVICES)
    rng = np.random.default_rng(0)
    with Server(store, "--min-updates", "5", "--aggregator", "fedavg") as server:
        import httpx

        for n in (0, 1):
            info = httpx.get(server.url + "/v1/round").json()
            assert info["round"] == n and info["accepted"] == 0 and info["min_updates"] == 5
            glob = get_global(server.url, n)
            assert glob.sha256 == info["global_sha256"] and glob.base_model_sha256 == info["base_model_sha256"]
            admitted = []
            for i, d in enumerate(DEVICES):
                kind = "diff" if (n == 1 and i % 2) else "full"  # round 2: some devices ship --since diffs
                body = device_update(glob, rng, change_a=variant == "lora-product", kind=kind, round_id=str(n))
                r = upload(server.url, n, body, device=d, token=tokens[d])
                assert r.status_code == 201, r.text
                sent = read_delta(body)
                full = {k: glob.tensors[k] + sent.tensors[k] for k in glob.tensors} if kind == "diff" else sent.tensors
                admitted.append((full, sent.num_examples))
                assert r.json()["weight"] == sent.num_examples and r.json()["round"] == n
            _wait_for_round(server.url, n + 1)
            new = get_global(server.url, n + 1)
            by_hand = _fedavg_by_hand(admitted)
            if variant == "frozen-a":  # FFA-LoRA: tensor-wise FedAvg is exact; A never moves
                for k in by_hand:
                    np.testing.assert_allclose(new.tensors[k], by_hand[k], rtol=1e-5, atol=1e-6)
                    if ".lora_A." in k:
                        np.testing.assert_array_equal(new.tensors[k], glob.tensors[k])
            else:  # A and B trained: the global's B·A is the best rank-r fit of the mean of the products
                mean = {layer: sum(_products(t)[layer] * w for t, w in admitted) / sum(w for _, w in admitted)
                        for layer in _products(admitted[0][0])}
                rank = json.loads((bundle / "edgetune.json").read_text())["method"]["config"]["rank"]
                report = httpx.get(server.url + "/v1/status").json()
                for layer, p in mean.items():
                    u, s, vt = np.linalg.svd(p)
                    np.testing.assert_allclose(_products(new.tensors)[layer], (u[:, :rank] * s[:rank]) @ vt[:rank],
                                               atol=1e-5)
                assert report["rounds"][n]["discarded_energy_max"] > 0  # 5 rank-r products do not fit rank r
                assert report["rounds"][n]["discarded_energy_max"] == pytest.approx(
                    max(float(np.sum(np.linalg.svd(p, compute_uv=False)[rank:] ** 2) / np.sum(p ** 2))
                        for p in mean.values()), rel=1e-4)
        status = httpx.get(server.url + "/v1/status").json()
        page = httpx.get(server.url + "/")
    assert [r["accepted"] for r in status["rounds"]] == [5, 5, 0]
    assert status["current_round"] == 2 and status["refused_total"] == 0
    losses = [r["loss"] for r in status["rounds"][:2]]
    assert all(isinstance(x, float) for x in losses)
    assert page.status_code == 200 and "<svg" in page.text and "polyline" in page.text
    # the CLI reads the same store after the server stopped
    r = cli("collect", "status", "--store", store, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["accepted_total"] == 10


def _wait_for_round(url: str, n: int, timeout: float = 60.0) -> None:
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(url + "/v1/round").json()["round"] >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"round {n} did not open within {timeout} s")


def test_deadline_aggregates_with_fewer_updates(tiny_bundle, tmp_path):
    """--round-timeout: a round with fewer than --min-updates closes at its deadline when it has --min-at-deadline."""
    store = tmp_path / "fleet"
    tokens = make_store(tiny_bundle, store, DEVICES[:2])
    with Server(store, "--min-updates", "10", "--round-timeout", "2", "--min-at-deadline", "2") as server:
        import httpx

        glob = get_global(server.url, 0)
        rng = np.random.default_rng(1)
        assert upload(server.url, 0, device_update(glob, rng), device="dev-0", token=tokens["dev-0"]).status_code == 201
        info = httpx.get(server.url + "/v1/round").json()
        assert info["deadline"] is not None
        import time

        time.sleep(3)  # past the deadline with 1 < 2 updates: the round stays open
        assert httpx.get(server.url + "/v1/round").json()["round"] == 0
        assert upload(server.url, 0, device_update(glob, rng), device="dev-1", token=tokens["dev-1"]).status_code == 201
        _wait_for_round(server.url, 1)
        assert httpx.get(server.url + "/v1/status").json()["rounds"][0]["trigger"] == "deadline"


def test_late_updates_and_dp(tiny_bundle, tmp_path):
    """--max-late 1 admits a round-0 update into round 1 at half weight; DP rounds record epsilon."""
    store = tmp_path / "fleet"
    tokens = make_store(tiny_bundle, store, DEVICES[:3])
    args = ("--min-updates", "2", "--max-late", "1", "--late-discount", "0.5", "--dp-noise-multiplier", "1.0",
            "--dp-clip", "0.5")
    with Server(store, *args) as server:
        import httpx

        rng = np.random.default_rng(2)
        g0 = get_global(server.url, 0)
        late_body = device_update(g0, rng, examples=10)
        for d in DEVICES[:2]:
            assert upload(server.url, 0, device_update(g0, rng), device=d, token=tokens[d]).status_code == 201
        _wait_for_round(server.url, 1)
        r = upload(server.url, 0, late_body, device="dev-2", token=tokens["dev-2"])
        assert r.status_code == 201 and r.json()["late"] == 1 and r.json()["weight"] == 5.0
        assert r.json()["aggregated_into"] == 1
        status = httpx.get(server.url + "/v1/status").json()
    first = status["rounds"][0]
    assert first["dp_noise_multiplier"] == 1.0 and first["dp_epsilon_total"] > 0
    db = sqlite3.connect(store / "collector.sqlite")
    report = json.loads(db.execute("SELECT report FROM rounds WHERE round = 0").fetchone()[0])
    assert report["dp"]["accountant"].startswith("zCDP") and report["dp"]["clip"] == 0.5
