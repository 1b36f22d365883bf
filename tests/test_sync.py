"""`edgetune sync` against a collector speaking the HTTP contract: one round end to end, retries,
refusals, a SIGKILL during the upload (the same bytes are re-sent under the same id), and no torch."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edgetune.bundle import Bundle, read_manifest
from edgetune.delta import apply_diff, encode_delta, read_delta
from edgetune.errors import EdgetuneError
from edgetune.federated.client import CollectorClient, CollectorError, RetryPolicy
from edgetune.federated.journal import JournalFile
from tests.fake_collector import FakeCollector

PAIRS = [("What is the colour of the sky?", "blue"), ("Name a fruit.", "apple"), ("Say hello.", "hello there")]
HEAVY = ("torch", "transformers", "peft", "optimum")
BLOCK_HEAVY = f"""
import sys
for name in {HEAVY!r}:
    sys.modules[name] = None
from edgetune.cli import main
main(sys.argv[1:])
"""


@pytest.fixture()
def bundle(tiny_bundle, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


@pytest.fixture()
def data(tmp_path) -> Path:
    path = tmp_path / "my.jsonl"
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in PAIRS * 3))
    return path


def _global(bundle: Path, seed: int = 1) -> tuple[bytes, dict]:
    """A full global adapter for the bundle with random (non-initial) values, and its tensors."""
    manifest = read_manifest(bundle)
    rng = np.random.default_rng(seed)
    tensors = {t.peft_key: rng.normal(0, 0.02, t.shape).astype(np.float32) for t in manifest.trainable}
    method = {"name": manifest.method["name"], "config": manifest.method["config"]}
    data = encode_delta(tensors, base_model_sha256=manifest.base_sha256, method=method, codec="fp32", kind="full")
    return data, read_delta(data).tensors


def _collector(bundle: Path, **kwargs) -> FakeCollector:
    manifest = read_manifest(bundle)
    data, _ = _global(bundle)
    method = {"name": manifest.method["name"], "config": manifest.method["config"]}
    return FakeCollector(kwargs.pop("base", manifest.base_sha256), method, data, **kwargs)


def _options(server: str, data: Path, **kwargs):
    from edgetune.federated.sync import SyncOptions
    from edgetune.runtime.trainer import TrainOptions

    train = TrainOptions(data=data, steps=kwargs.pop("steps", 3), batch_size=2, lr=1e-2, save_every=1)
    retry = kwargs.pop("retry", RetryPolicy(attempts=4, base=0.01, cap=0.05, budget=1.0))
    return SyncOptions(server=server, train=train, token="t0ken", device="phone-1", retry=retry, **kwargs)


def _cli(*args, block_heavy=False, **popen):
    cmd = [sys.executable, "-c", BLOCK_HEAVY] if block_heavy else [sys.executable, "-m", "edgetune.cli"]
    return subprocess.Popen([*cmd, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_one_round_pushes_the_trained_difference_and_a_rerun_does_nothing(bundle, data):
    from edgetune.federated.sync import sync
    from edgetune.runtime.adapter_source import latest_adapter

    manifest = read_manifest(bundle)
    with _collector(bundle) as server:
        result = sync(bundle, _options(server.url, data), log=lambda m: None)
        assert result.status == "pushed" and len(result.losses) == 3
        (update_id, (round_number, body)), = server.updates.items()
        assert update_id == result.update_id and round_number == 0
        update = read_delta(body)
        assert update.kind == "diff" and update.since_sha256 == server.global_sha256 and update.round_id == "0"
        assert update.num_examples == 9
        # global + the shipped difference == the adapter trained on the device (fp16 codec of the difference)
        trained = latest_adapter(Bundle.open(bundle)).tensors
        rebuilt = apply_diff(read_delta(server.global_bytes).tensors, update.tensors)
        for t in manifest.trainable:
            np.testing.assert_allclose(rebuilt[t.peft_key], trained[t.graph_name], atol=2e-3)
        assert any(np.abs(update.tensors[k]).max() > 0 for k in update.tensors)  # it trained

        again = sync(bundle, _options(server.url, data), log=lambda m: None)
        assert again.status == "already pushed" and again.update_id == update_id
        assert len(server.pushes()) == 1


def test_training_starts_from_the_global_adapter(bundle, data):
    """Step 0 of the device's run is the global adapter: zero steps of change == the global itself."""
    from edgetune.federated.sync import _pull
    from edgetune.runtime.adapter_source import latest_adapter

    manifest = read_manifest(bundle)
    with _collector(bundle) as server:
        client = CollectorClient(server.url, "t")
        files = JournalFile(bundle / "sync-state")
        _pull(client, files, client.round_info(), Bundle.open(bundle), bundle / "train-state")
        imported = latest_adapter(Bundle.open(bundle)).tensors
        expected = read_delta(server.global_bytes).tensors
        for t in manifest.trainable:
            np.testing.assert_array_equal(imported[t.graph_name], expected[t.peft_key])
        assert files.load().phase == "pulled"


def test_refuses_a_server_for_another_base_model(bundle, data):
    from edgetune.federated.sync import sync

    with _collector(bundle, base="0" * 64) as server:
        with pytest.raises(CollectorError, match="base model 0000000000000000"):
            sync(bundle, _options(server.url, data), log=lambda m: None)
        assert [e[1] for e in server.log] == ["/v1/round"]  # nothing pulled, nothing trained
    assert not (bundle / "train-state").exists()


def test_retries_busy_server_and_lost_answers_without_duplicates(bundle, data):
    """503s on the first requests, then the first upload is stored but its answer is lost: the retry
    carries the same id and bytes, and the collector ends up with exactly one update."""
    from edgetune.federated.sync import sync

    with _collector(bundle, fail_first=2, drop_after_store=1) as server:
        result = sync(bundle, _options(server.url, data), log=lambda m: None)
        assert result.status == "pushed"
        assert len(server.updates) == 1
        pushes = server.pushes()
        assert len(pushes) == 2 and pushes[0][2:] == pushes[1][2:]  # same id, same bytes


def test_backoff_is_bounded_and_jittered():
    policy = RetryPolicy(attempts=8, base=0.5, cap=4.0, budget=100.0)
    rng = random.Random(0)
    delays = [[policy.delay(k, rng) for k in range(8)] for _ in range(200)]
    for k in range(8):
        column = [row[k] for row in delays]
        assert max(column) <= min(4.0, 0.5 * 2 ** k) and min(column) >= 0
        assert len(set(column)) > 150  # jittered, not in step
    assert policy.delay(0, rng, retry_after=3.0) >= 3.0 and policy.delay(0, rng, retry_after=99) <= 4.0


def test_gives_up_after_the_bounded_attempts(bundle):
    slept = []
    client = CollectorClient("http://127.0.0.1:9", "t", retry=RetryPolicy(attempts=3, base=0.01, cap=0.02),
                             sleep=slept.append)  # port 9 (discard): connection refused
    with pytest.raises(CollectorError, match="failed after 3 attempt"):
        client.round_info()
    assert len(slept) == 2 and all(0 <= s <= 0.02 for s in slept)


def test_a_refusal_is_final_and_recorded(bundle, data):
    from edgetune.federated.sync import sync

    with _collector(bundle, refuse_with=(422, "L2 norm 1e9 exceeds the bound 10")) as server:
        with pytest.raises(CollectorError, match="422: L2 norm 1e9"):
            sync(bundle, _options(server.url, data), log=lambda m: None)
        journal = JournalFile(bundle / "sync-state").load()
        assert journal.phase == "refused" and "L2 norm" in journal.reason
        again = sync(bundle, _options(server.url, data), log=lambda m: None)
        assert again.status == "already refused" and len(server.pushes()) == 1


def test_needs_a_token_or_a_key(data):
    from edgetune.federated.sync import SyncOptions
    from edgetune.runtime.trainer import TrainOptions

    with pytest.raises(EdgetuneError, match="--token"):
        SyncOptions(server="http://x", train=TrainOptions(data=data))
    with pytest.raises(CollectorError, match="not an http"):
        CollectorClient("ftp://x")


def test_sigkill_during_upload_resends_the_same_bytes_under_the_same_id_without_torch(bundle, data, tmp_path):
    """The device is killed while its upload is in flight (the collector holds the request). The
    re-run, on a device without torch, sends byte-identical data under the same update id."""
    hold = threading.Event()
    args = ["sync", bundle, "--server", None, "--token", "t0ken", "--device-id", "phone-1", "--data", data,
            "--steps", 2, "--batch-size", 2, "--quiet", "--retries", 2]
    with _collector(bundle, hold_push=hold) as server:
        args[3] = server.url
        first = _cli(*args)
        while not server.pushes_seen.wait(0.5):
            assert first.poll() is None, first.communicate()[1][-2000:]
        first.kill()  # SIGKILL: no cleanup runs
        first.wait()
        hold.set()
        journal = JournalFile(bundle / "sync-state").load()
        assert journal.phase == "written"
        second = _cli(*args, block_heavy=True)
        out, err = second.communicate(timeout=240)
        assert second.returncode == 0, err[-2000:]
        assert "round 0: pushed" in out
        pushes = server.pushes()
        assert len(pushes) == 2
        assert pushes[0][2] == pushes[1][2] == journal.update_id
        assert pushes[0][3] == pushes[1][3]  # byte for byte
        assert list(server.updates) == [journal.update_id]

        third = _cli(*args, block_heavy=True)
        out, err = third.communicate(timeout=240)
        assert third.returncode == 0 and "already pushed" in out, err[-2000:]
        assert len(server.pushes()) == 2


def test_cli_errors_are_one_line(bundle, data):
    with _collector(bundle, base="f" * 64) as server:
        p = _cli("sync", bundle, "--server", server.url, "--token", "t", "--data", data, "--steps", 1)
        out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and err.strip().count("\n") == 0 and err.startswith("error: --server")


def test_three_devices_two_rounds_through_the_real_collector(bundle, data, tmp_path):
    """`edgetune sync` on 3 devices against `edgetune collect serve` (uvicorn on 127.0.0.1): each round
    admits one update per device, the round advances, and round 2 trains from round 1's aggregate."""
    pytest.importorskip("uvicorn")
    from tests.collector_helpers import Server, get_global, make_store

    devices = ["dev-0", "dev-1", "dev-2"]
    tokens = make_store(bundle, tmp_path / "fleet", devices)
    folders = {}
    for d in devices:  # every device has its own copy of the bundle and its own state
        folders[d] = tmp_path / d
        shutil.copytree(bundle, folders[d])
    manifest = read_manifest(bundle)
    with Server(tmp_path / "fleet", "--min-updates", "3") as server:
        for n in (0, 1):
            glob = get_global(server.url, n)
            for i, d in enumerate(devices):
                p = _cli("sync", folders[d], "--server", server.url, "--token", tokens[d], "--device-id", d,
                         "--data", data, "--steps", 1, "--batch-size", 2, "--seed", i, "--quiet",
                         *(["--kind", "full"] if i == 0 else []))
                out, err = p.communicate(timeout=240)
                assert p.returncode == 0 and f"round {n}: pushed" in out, err[-2000:]
                journal = JournalFile(folders[d] / "sync-state").load()
                assert journal.round == n and journal.phase == "pushed" and journal.global_sha256 == glob.sha256
                assert (folders[d] / "sync-state" / "rounds" / f"global-{n:06d}.etd").read_bytes() == \
                    server_global_bytes(server.url, n)
            status = _wait_round(server.url, n + 1)
            assert status["rounds"][n]["accepted"] == 3 and status["refused_total"] == 0
        p = _cli("sync", folders["dev-0"], "--server", server.url, "--token", tokens["dev-0"], "--device-id", "dev-0",
                 "--data", data, "--steps", 1, "--quiet")
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0 and "round 2: pushed" in out, err
    assert manifest.trainable  # the bundle was read, nothing else changed


def server_global_bytes(url: str, n: int) -> bytes:
    import httpx

    return httpx.get(f"{url}/v1/rounds/{n}/global", timeout=30).content


def _wait_round(url: str, n: int, timeout: float = 60.0) -> dict:
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = httpx.get(url + "/v1/status", timeout=10).json()
        if status["current_round"] >= n:
            return status
        time.sleep(0.2)
    raise AssertionError(f"round {n} did not open within {timeout} s: {status}")
