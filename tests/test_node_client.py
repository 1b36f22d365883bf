"""The Node.js reference client (devices/node/) against the Python portable backend: 10 steps, same numbers.

Runs when node and npm are on the machine and the client's package is installed
(`cd devices/node && npm install --ignore-scripts`); skipped otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

NODE_DIR = Path(__file__).resolve().parent.parent / "devices" / "node"
STEPS, LR = 10, 1e-3

pytestmark = pytest.mark.skipif(
    not (shutil.which("node") and shutil.which("npm") and (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir()),
    reason="needs node, npm and `npm install --ignore-scripts` in devices/node")


def test_node_client_trains_like_the_python_trainer(tiny_bundle, tmp_path):
    from safetensors.numpy import load_file, save_file

    from edgetune.bundle import Bundle
    from edgetune.runtime.backend import open_backend

    bundle = Bundle.open(tiny_bundle)
    assert bundle.manifest.portable and bundle.manifest.portable["supported"]
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(3):
        ids = rng.integers(3, 300, (2, 12)).astype(np.int64)
        labels = ids.copy()
        labels[:, :4] = -100  # a prompt part without loss
        batches.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels})
    backend = open_backend("portable", bundle, threads=1)  # the Python trainer that runs the same graph
    # a non-zero B so every tensor gets gradients from the first step
    start = {k: (v + 0.02 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in backend.trainable().items()}
    backend.set_trainable(start)
    save_file(start, str(tmp_path / "init.safetensors"))
    losses = []
    for step in range(STEPS):
        losses.append(backend.train_step(batches[step % len(batches)]))
        backend.optimizer_step(LR)
    expected = backend.trainable()

    (tmp_path / "batches.json").write_text(json.dumps([{k: v.tolist() for k, v in b.items()} for b in batches]))
    run = subprocess.run(["node", str(NODE_DIR / "client.mjs"), "--bundle", str(tiny_bundle), "--init",
                          str(tmp_path / "init.safetensors"), "--batches", str(tmp_path / "batches.json"),
                          "--steps", str(STEPS), "--lr", str(LR), "--out", str(tmp_path / "trained.safetensors"),
                          "--losses", str(tmp_path / "losses.json")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    node_losses = json.loads((tmp_path / "losses.json").read_text())
    np.testing.assert_allclose(node_losses, losses, rtol=1e-4)
    trained = load_file(str(tmp_path / "trained.safetensors"))
    assert set(trained) == set(expected)
    flat = lambda d: np.concatenate([d[k].ravel() for k in sorted(d)])  # noqa: E731
    moved = flat(expected) - flat(start)
    assert np.linalg.norm(moved) > 0  # training changed the adapter
    error = np.linalg.norm(flat(trained) - flat(expected)) / np.linalg.norm(flat(expected))
    print(f"node vs python: losses max rel {np.max(np.abs(np.array(node_losses) / losses - 1)):.2e}, adapter rel {error:.2e}")
    assert error <= 1e-4
