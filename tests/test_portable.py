"""The portable backend against the ort-training backend, in this environment (which has both).

The stock-package proof (Python 3.12, no training build) is tests/test_portable_py312.py and the
arm64 one tests/test_portable_arm64.py; here: AdamW against PyTorch and ORT, gradient accumulation,
checkpoints across backends, kill -9 and resume across backends, and the refusals.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgetune.bundle import read_manifest
from edgetune.bundle import Bundle
from edgetune.runtime.ort_import import training_build_installed
from tests.portable_runs import assert_same_run, assert_trained, read_run, train_cli, write_pairs

needs_training_build = pytest.mark.skipif(not training_build_installed(), reason="needs onnxruntime-training-cpu (the reference backend)")
ADAMW = dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)  # not the defaults, so each one is exercised


@pytest.fixture(scope="module")
def decay_bundle(export_tiny) -> Path:
    """int8 base, AdamW with weight decay and non-default betas/eps."""
    from edgetune.export.artifacts import AdamWSettings

    return export_tiny(quantize="int8", adamw=AdamWSettings(**ADAMW))


@pytest.fixture()
def bundle(decay_bundle, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(decay_bundle, copy)
    return copy


def _batches(vocab: int, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Random (2, 12) batches; the first 4 positions of each row are prompt (label -100), one row padded."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, (2, 12))
        mask = np.ones_like(ids)
        mask[1, 9:] = 0
        labels = np.where(mask == 1, ids, -100)
        labels[:, :4] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_adamw_matches_torch(seed):
    torch = pytest.importorskip("torch")
    from edgetune.runtime.adamw import AdamWHyper, AdamWState, adamw_step

    rng = np.random.default_rng(seed)
    hyper = AdamWHyper(**ADAMW)
    params = {"a": rng.normal(size=(8, 16)).astype(np.float32), "b": np.zeros((16, 3), np.float32)}
    ref = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    opt = torch.optim.AdamW(list(ref.values()), lr=1.0, **ADAMW)
    state = AdamWState()
    for lr in (1e-2, 3e-3, 0.0, 5e-2, 1e-3):
        grads = {k: rng.normal(scale=10.0 ** rng.integers(-4, 2), size=v.shape).astype(np.float32) for k, v in params.items()}
        adamw_step(params, grads, state, hyper, lr)
        for group in opt.param_groups:
            group["lr"] = lr
        for k, t in ref.items():
            t.grad = torch.from_numpy(grads[k])
        opt.step()
        for k, t in ref.items():
            np.testing.assert_allclose(params[k], t.detach().numpy(), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(state.exp_avg_sq[k], opt.state[t]["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-12)
    assert state.step == 5


@pytest.mark.parametrize("bad, message", [
    ({"name": "sgd"}, "not 'adamw'"), ({"betas": [0.9]}, "betas"), ({"eps": 0}, "eps"), ({"weight_decay": -1}, "weight_decay"),
])
def test_adamw_refuses_bad_manifest_settings(bad, message):
    from edgetune.errors import BundleError
    from edgetune.runtime.adamw import AdamWHyper

    good = {"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    assert AdamWHyper.from_manifest(good).betas == (0.9, 0.999)
    with pytest.raises(BundleError, match=message):
        AdamWHyper.from_manifest({**good, **bad})


@needs_training_build
@pytest.mark.parametrize("grad_accum", [1, 3])
def test_portable_steps_match_ort_training(decay_bundle, grad_accum):
    """Same batches, 6 optimizer steps of ``grad_accum`` micro-batches: losses, eval loss and weights agree."""
    from edgetune.runtime.backend import open_backend

    opened = Bundle.open(decay_bundle)
    batches = _batches(opened.manifest.base_model["config"]["vocab_size"], 6 * grad_accum)
    runs = {}
    for name in ("ort-training", "portable"):
        backend = open_backend(name, opened, with_eval=True)
        initial = backend.trainable()
        losses = []
        for step in range(6):
            for micro in range(grad_accum):
                losses.append(backend.train_step(batches[step * grad_accum + micro]))
            if step == 2:  # a NaN-style discard in the middle: the next step must start from zero gradients
                backend.discard_gradients()
                losses.append(backend.train_step(batches[0]))
            backend.optimizer_step(1e-2 * (step + 1))
        losses.append(backend.eval_loss(batches[1]))
        runs[name] = (np.array(losses), backend.trainable())
    assert_same_run(runs["portable"], runs["ort-training"], rtol=1e-4)
    assert_trained(runs["ort-training"][1], initial)


@needs_training_build
def test_checkpoints_cross_backends(bundle, tmp_path):
    """ORT writes -> portable reads; portable writes -> ORT reads: weights, moments and step survive."""
    from edgetune.runtime.backend import open_backend
    from edgetune.runtime.ort_checkpoint import read_trainable

    opened = Bundle.open(bundle)
    names = [t.graph_name for t in opened.manifest.trainable]
    batches = _batches(opened.manifest.base_model["config"]["vocab_size"], 8, seed=3)

    def steps(backend, chunk):
        for batch in chunk:
            backend.train_step(batch)
            backend.optimizer_step(5e-3)

    ort = open_backend("ort-training", opened)
    steps(ort, batches[:3])
    ort.save(tmp_path / "from-ort")
    portable = open_backend("portable", opened, checkpoint=tmp_path / "from-ort")
    state = read_trainable(tmp_path / "from-ort", names)
    assert state.adamw.step == 3 and all(np.abs(state.adamw.exp_avg[n]).max() > 0 for n in names)
    steps(portable, batches[3:6])
    portable.save(tmp_path / "from-portable")
    back = open_backend("ort-training", opened, checkpoint=tmp_path / "from-portable")
    assert read_trainable(tmp_path / "from-portable", names).adamw.step == 6
    steps(back, batches[6:])
    steps(ort, batches[3:])  # the uninterrupted ORT run
    reference = ort.trainable()
    for name, value in back.trainable().items():
        assert np.linalg.norm(value - reference[name]) <= 1e-4 * np.linalg.norm(reference[name]), name


def test_initial_adapter_read_without_training_api(bundle):
    """The bundle's checkpoint (an ORT flatbuffer) read by edgetune's own reader equals what ORT reads;
    reading it builds no session and needs no portable graph."""
    from edgetune.runtime.backend import open_backend

    manifest = read_manifest(bundle)
    path = bundle / "edgetune.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "portable": None}))
    ours = open_backend("portable", Bundle.open(bundle), training=False).initial_adapter()
    assert set(ours) == {t.graph_name for t in manifest.trainable}
    assert all(ours[t.graph_name].shape == tuple(t.shape) and ours[t.graph_name].dtype == np.float32 for t in manifest.trainable)
    if training_build_installed():
        from edgetune.runtime.ort_import import training_api

        state = training_api().CheckpointState.load_checkpoint(str(bundle / "checkpoint"))
        for name, value in ours.items():
            np.testing.assert_array_equal(value, np.asarray(state.parameters[name].data))


@pytest.mark.parametrize("damage", ["truncate", "not-a-checkpoint", "empty"])
def test_damaged_checkpoint_is_a_clear_error(bundle, tmp_path, damage):
    from edgetune.errors import TrainingError
    from edgetune.runtime.ort_checkpoint import read_trainable

    data = (bundle / "checkpoint").read_bytes()
    bad = tmp_path / "checkpoint"
    bad.write_bytes({"truncate": data[: len(data) // 3], "not-a-checkpoint": b"hello world, not flatbuffers",
                     "empty": b""}[damage])
    names = [t.graph_name for t in read_manifest(bundle).trainable]
    with pytest.raises(TrainingError, match="checkpoint|not an ONNX Runtime"):
        read_trainable(bad, names)


@needs_training_build
@pytest.mark.parametrize("first, second", [("ort-training", "portable"), ("portable", "ort-training")])
def test_kill_under_one_backend_resume_under_the_other(bundle, tmp_path, first, second):
    data = write_pairs(tmp_path / "pairs.jsonl", repeat=6)
    args = ["--data", data, "--steps", 24, "--batch-size", 2, "--grad-accum", 2, "--lr", 5e-3, "--warmup", 3,
            "--save-every", 4]
    assert train_cli(bundle, tmp_path / "reference", *args, "--backend", first).returncode == 0

    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-m", "edgetune.cli", "train", str(bundle), "--state-dir", str(state),
                             "--quiet", "--backend", first, *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    latest = state / "LATEST"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and int(latest.read_text().strip().split("-")[1]) >= 8:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed; make the run longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(latest.read_text().strip().split("-")[1])
    assert 8 <= killed_at < 24
    assert json.loads((state / latest.read_text().strip() / "trainer.json").read_text())["backend"] == first
    r = train_cli(bundle, state, *args, "--backend", second, "--resume")
    assert r.returncode == 0, r.stderr
    assert f"resuming from step {killed_at}" in r.stderr
    assert_same_run(read_run(state), read_run(tmp_path / "reference"), rtol=1e-4)


def test_portable_refuses_bundle_marked_not_portable(bundle, tmp_path):
    path = bundle / "edgetune.json"
    manifest = json.loads(path.read_text())
    manifest["portable"] = {**(manifest.get("portable") or {}), "supported": False,
                            "unsupported": [{"op_type": "FancyGrad", "node": "/model/x/FancyGrad_0"}]}
    path.write_text(json.dumps(manifest))
    r = train_cli(bundle, tmp_path / "state", "--data", write_pairs(tmp_path / "d.jsonl"), "--steps", 1,
                  "--backend", "portable")
    assert r.returncode == 2, r.stderr
    assert "not portable" in r.stderr and "FancyGrad (node /model/x/FancyGrad_0)" in r.stderr
    assert "--backend ort-training" in r.stderr
    assert "Traceback" not in r.stderr


def test_portable_refuses_bundle_without_portable_graph(bundle, tmp_path):
    path = bundle / "edgetune.json"
    manifest = json.loads(path.read_text())
    manifest["portable"] = None
    path.write_text(json.dumps(manifest))
    r = train_cli(bundle, tmp_path / "state", "--data", write_pairs(tmp_path / "d.jsonl"), "--steps", 1,
                  "--backend", "portable")
    assert r.returncode == 2 and "no portable graph" in r.stderr and "re-export" in r.stderr, r.stderr


def test_portable_eval_generate_delta_cli(bundle, tmp_path):
    """The device commands after a portable run: eval with --backend portable, generate and delta read its checkpoint."""
    data = write_pairs(tmp_path / "d.jsonl")
    state = tmp_path / "state"
    r = train_cli(bundle, state, "--data", data, "--steps", 3, "--backend", "portable", "--lr", 1e-2)
    assert r.returncode == 0, r.stderr

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "edgetune.cli", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    r = cli("eval", bundle, "--data", data, "--backend", "portable", "--state-dir", state, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["adapter"] == "trained, step 3"
    r = cli("generate", bundle, "--prompt", "Say hello.", "--max-new-tokens", 3, "--state-dir", state)
    assert r.returncode == 0 and "trained, step 3" in r.stderr, r.stderr
    r = cli("delta", bundle, "--out", tmp_path / "u.etd", "--state-dir", state)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("writer", ["portable", "ort-training"])
def test_portable_nan_loss_stops_and_keeps_checkpoint(bundle, tmp_path, writer):
    """An overflowing adapter (imported as a step-0 checkpoint by either backend): the portable run stops
    at step 1 naming the kept checkpoint, which is left as it was."""
    from edgetune.errors import TrainingError
    from edgetune.runtime.adapter_source import initial_adapter
    from edgetune.runtime.import_adapter import import_adapter
    from edgetune.runtime.trainer import TrainOptions, train

    if writer == "ort-training" and not training_build_installed():
        pytest.skip("needs onnxruntime-training-cpu")
    huge = {k: np.full_like(v, 3e38) for k, v in initial_adapter(Bundle.open(bundle)).items()}
    ckpt = import_adapter(Bundle.open(bundle), huge, "test: overflowing adapter", backend=writer)
    before = (ckpt / "checkpoint").read_bytes()
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at step 1; .*checkpoint at step 0"):
        train(Bundle.open(bundle), TrainOptions(data=write_pairs(tmp_path / "d.jsonl"), steps=3, backend="portable"),
              progress=False)
    assert (bundle / "train-state" / "LATEST").read_text().strip() == ckpt.name
    assert (ckpt / "checkpoint").read_bytes() == before
