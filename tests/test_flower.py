"""Flower (flwr 1.42, Message API): a simulation of 5 edgetune ClientApps for 2 rounds on a tiny
model; the aggregate equals FedAvg computed by hand from the replies, and bad replies are refused
by the collector's own admission checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from edgetune.bundle import read_manifest  # noqa: E402

PAIRS = [("What is the colour of the sky?", "blue"), ("Name a fruit.", "apple"), ("Say hello.", "hello there"),
         ("Count to three.", "one two three"), ("Name a colour.", "red"), ("Say goodbye.", "bye"),
         ("What is two plus two?", "four")]
NODES, ROUNDS = 5, 2


def _run_simulation(config: dict, strategy) -> object:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from edgetune.federated.flower.client_app import handle_train
    from edgetune.federated.flower.server_app import run_rounds

    client = ClientApp()

    @client.train()
    def train(msg, context):
        return handle_train(msg, context, overrides=config)

    server = ServerApp()
    results = []

    @server.main()
    def main(grid, context):
        results.append(run_rounds(grid, {**config}, strategy))

    # Flower's Ray backend writes this process's sys.path into os.environ["PYTHONPATH"] and leaves
    # it there; later tests that start another interpreter (the Python 3.12 environment) would
    # then import this venv's 3.11 standard library. Put the variable back as it was.
    saved = os.environ.get("PYTHONPATH")
    try:
        run_simulation(server_app=server, client_app=client, num_supernodes=NODES,
                       backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    assert results, "the ServerApp did not finish"
    return results[0]


def test_simulation_five_nodes_two_rounds_is_fedavg_of_the_replies(export_tiny, tmp_path):
    from edgetune.delta import read_delta
    from edgetune.federated.flower.arrays import from_record
    from edgetune.federated.flower.config import merged
    from edgetune.federated.flower.server_app import build_strategy

    bundle = export_tiny(quantize="none", rank=4)  # LoRA A and B both trained: product space by default
    data = tmp_path / "fleet.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in PAIRS * 2))
    config = merged({"bundle": str(bundle), "data": str(data), "num-server-rounds": ROUNDS, "local-steps": 2,
                     "lr": 1e-2, "batch-size": 2, "min-nodes": NODES, "space": "tensor",
                     "global-out": str(tmp_path / "global.etd")})
    manifest = read_manifest(bundle)
    strategy = build_strategy(config, manifest)
    result = _run_simulation(config, strategy)

    assert [r.round for r in strategy.history] == [1, 2]
    sizes = sorted(len((PAIRS * 2)[i::NODES]) for i in range(NODES))  # each node's share of the 14 records
    for record in strategy.history:
        assert not record.refused and len(record.replies) == NODES
        assert sorted(n for _, _, n in record.replies) == sizes
        total = sum(n for _, _, n in record.replies)
        for key, start in record.start.items():
            expected = sum(n * adapter[key].astype(np.float64) for _, adapter, n in record.replies) / total
            np.testing.assert_allclose(record.result[key], expected, rtol=1e-5, atol=1e-7)
            assert not np.allclose(expected, start)  # the nodes trained
    # round 2 started from round 1's aggregate, and the final arrays are round 2's
    for key in strategy.history[0].result:
        np.testing.assert_array_equal(strategy.history[1].start[key], strategy.history[0].result[key])
    final = from_record(result.arrays)
    written = read_delta(tmp_path / "global.etd")
    for key in final:
        np.testing.assert_array_equal(final[key], strategy.history[1].result[key])
        np.testing.assert_array_equal(written.tensors[key], final[key])
    assert written.base_model_sha256 == manifest.base_sha256


def test_strategy_refuses_bad_replies_with_the_collectors_checks(tiny_bundle):
    """Replies with NaN, wrong shapes, no examples or a norm bomb are left out; FedAvg of the rest."""
    from types import SimpleNamespace

    from flwr.app import MetricRecord, RecordDict

    from edgetune.federated.flower.arrays import to_record
    from edgetune.federated.flower.config import merged
    from edgetune.federated.flower.server_app import build_strategy

    manifest = read_manifest(tiny_bundle)
    strategy = build_strategy(merged({"bundle": str(tiny_bundle), "max-norm": 5.0, "space": "tensor"}), manifest)
    rng = np.random.default_rng(0)
    start = {t.peft_key: rng.normal(0, 0.1, t.shape).astype(np.float32) for t in manifest.trainable}
    strategy._current = start
    key = manifest.trainable[0].peft_key

    def reply(node, tensors, examples):  # what aggregate_train reads of a flwr Message (one needs a live run)
        content = RecordDict({"arrays": to_record(tensors), "metrics": MetricRecord({"num-examples": examples})})
        return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False)

    good = [{k: v + 0.01 * (i + 1) for k, v in start.items()} for i in range(2)]
    nan = {**start, key: np.full_like(start[key], np.nan)}
    shape = {**start, key: np.zeros((1, 1), np.float32)}
    bomb = {k: v + 100.0 for k, v in start.items()}
    replies = [reply(1, good[0], 3), reply(2, good[1], 1), reply(3, nan, 2), reply(4, shape, 2),
               reply(5, start, 0), reply(6, bomb, 2)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    record = strategy.history[-1]
    assert sorted(reason for _, reason, _ in record.refused) == ["no_examples", "non_finite", "norm_too_large",
                                                                 "wrong_tensors"]
    assert metrics["admitted"] == 2 and metrics["refused"] == 4
    for k in start:
        np.testing.assert_allclose(record.result[k], (3 * good[0][k] + good[1][k]) / 4, rtol=1e-6)


def test_pyproject_run_config_matches_the_apps_defaults():
    """`flwr run .` reads [tool.flwr.app.config]: same keys and types as the apps' defaults, valid components."""
    import tomllib

    from flwr.common.config import validate_config

    from edgetune.federated.flower.config import DEFAULTS, merged

    project = Path(__file__).resolve().parents[1]
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(pyproject, check_module=True, project_dir=str(project))
    assert ok, errors
    run_config = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(run_config) == set(DEFAULTS)
    assert merged(run_config) == {**DEFAULTS, **run_config}


def test_flower_apps_and_sync_import_without_torch():
    """A SuperNode is a device: the ClientApp (and the ServerApp, strategy and sync) load with torch & co. absent."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('torch', 'transformers', 'peft', 'optimum'): sys.modules[m] = None\n"
            "import edgetune.federated.flower.client_app, edgetune.federated.flower.server_app\n"
            "import edgetune.federated.flower.strategy, edgetune.federated.sync, edgetune.commands.sync_cmd\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
