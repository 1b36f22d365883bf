"""Task dpo: one AdamW step equals a plain PyTorch + PEFT DPO step; reference log-probabilities equal
PEFT's with the adapter disabled; preference records are checked; eval, delta and to-peft work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgetune.bundle import Bundle, read_manifest
from tests.reference import peft_model
from tests.test_runtime import _cli

RTOL = 1e-4
BETA = 0.1
PAIRS = [
    ("What is the colour of the sky?", "Blue.", "The sky is usually blue during the day."),
    ("Name a fruit.", "Apple.", "There are many fruits; one of them is the apple."),
    ("Say hello.", "Hello.", "Hello there, it is very nice to meet you!"),
]


def _write(path: Path, rows=PAIRS, repeat=1) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows * repeat))
    return path


@pytest.fixture(scope="module")
def dpo_bundle(export_tiny) -> Path:
    return export_tiny(quantize="none", task="dpo", beta=BETA)


@pytest.fixture()
def bundle(dpo_bundle, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(dpo_bundle, copy)
    return copy


def _torch_logps(model, rows: dict) -> "torch.Tensor":
    """(R,) summed log-probabilities of each row's label tokens after the causal shift."""
    import torch

    out = model(input_ids=torch.tensor(rows["input_ids"]), attention_mask=torch.tensor(rows["attention_mask"]))
    logits = out.logits[:, :-1].float()
    labels = torch.tensor(rows["labels"])[:, 1:]
    keep = labels != -100
    token = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * keep).sum(-1)


def _peft_dpo_step(model, rows: dict, lr: float, optimizer: dict):
    """Plain PyTorch DPO (as TRL's sigmoid loss) with the reference = the same PEFT model, adapter disabled."""
    import torch
    from peft import get_peft_model_state_dict

    model.train()
    with torch.no_grad(), model.disable_adapter():
        ref = _torch_logps(model, rows)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(optimizer["betas"]), eps=optimizer["eps"],
                            weight_decay=optimizer["weight_decay"])
    policy = _torch_logps(model, rows)
    p = policy.shape[0] // 2
    logits = BETA * ((policy[:p] - ref[:p]) - (policy[p:] - ref[p:]))
    loss = -torch.nn.functional.logsigmoid(logits).mean()
    loss.backward()
    opt.step()
    state = get_peft_model_state_dict(model)
    return float(loss.detach()), ref.numpy().astype(np.float64), {k: v.detach().numpy().copy() for k, v in state.items()}


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("backend_name", ["ort-training", "portable"])
def test_one_adamw_step_matches_pytorch_peft_dpo(dpo_bundle, tiny_model_dir, tmp_path, backend_name):
    from edgetune.runtime.backend import open_backend
    from edgetune.runtime.dpo import TASK, preference_batch
    from edgetune.runtime.state import StateDir

    opened = Bundle.open(dpo_bundle)
    manifest = opened.manifest
    pairs, _ = TASK.load(opened, _write(tmp_path / "p.jsonl"), 256, False)
    backend = open_backend(backend_name, opened, with_eval=True)  # the reference pass runs the eval graph
    rng = np.random.default_rng(1)  # B != 0: the policy differs from the reference and A gets gradients
    start = {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in backend.initial_adapter().items()}
    backend.set_trainable(start)
    pairs = TASK.prepare(opened, backend, pairs, StateDir(tmp_path / "state"), "", lambda m: None)
    batch = preference_batch(pairs, manifest.tokenizer.pad_token_id)
    lr = 1e-3
    loss = backend.train_step(batch)
    backend.optimizer_step(lr)
    after = backend.trainable()

    by_peft = {t.peft_key: start[t.graph_name] for t in manifest.trainable}
    rows = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    ref_loss, ref_logps, ref_after = _peft_dpo_step(peft_model(tiny_model_dir, manifest, by_peft), rows, lr,
                                                    manifest.optimizer)
    ours = np.array([x for p in pairs for x in p.ref]).reshape(-1, 2).T.ravel()  # chosen rows, then rejected
    assert _rel(ours, ref_logps) <= RTOL
    assert abs(loss - ref_loss) <= RTOL * abs(ref_loss)
    assert abs(ref_loss - np.log(2)) > 1e-3  # the policy is not the reference: a real comparison
    for t in manifest.trainable:
        assert _rel(after[t.graph_name], ref_after[t.peft_key]) <= RTOL, t.peft_key
        assert not np.allclose(after[t.graph_name], start[t.graph_name])


def test_labels_cover_the_reply_only(dpo_bundle, tmp_path):
    from edgetune.runtime.dpo import TASK
    from edgetune.runtime.text import load_text

    opened = Bundle.open(dpo_bundle)
    tokenizer, _ = load_text(opened)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Yo."},
                                             {"role": "user", "content": "Name a fruit."}],
                                "chosen": [{"role": "assistant", "content": "Apple."}], "rejected": "A pear, maybe."}) + "\n")
    (pair,), stats = TASK.load(opened, path, 256, False)
    for e, reply in ((pair.chosen, "Apple."), (pair.rejected, "A pear, maybe.")):
        labelled = tokenizer.decode([int(t) for t in e.labels[e.labels != -100]], skip_special_tokens=False)
        assert labelled.startswith(reply) and "Yo." not in labelled and "fruit" not in labelled


@pytest.mark.parametrize("record, expected", [
    ({"chosen": "a", "rejected": "b"}, 'line 2: missing field "prompt"'),
    ({"prompt": "q", "rejected": "b"}, 'line 2: field "chosen" must be'),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, 'line 2: field "rejected" must be'),
    ({"prompt": "q", "messages": [], "chosen": "a", "rejected": "b"}, 'give "prompt" or "messages"'),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, "ends with an assistant turn"),
    ({"messages": [{"role": "wizard", "content": "q"}], "chosen": "a", "rejected": "b"}, "messages[0] has role 'wizard'"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, 'field "prompt" must be'),
])
def test_malformed_records_name_file_line_and_field(bundle, tmp_path, record, expected):
    path = _write(tmp_path / "bad.jsonl", PAIRS[:1])
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    r = _cli("train", bundle, "--data", path, "--steps", 1)
    assert r.returncode == 2 and "bad.jsonl" in r.stderr and expected in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_train_eval_delta_to_peft(bundle, tmp_path):
    """Training on the pairs raises the held-out reward margin; eval reports adapter on and off; the
    delta converts to a PEFT folder holding the trained tensors."""
    from safetensors.numpy import load_file

    data = _write(tmp_path / "p.jsonl", repeat=4)
    r = _cli("train", bundle, "--data", data, "--steps", 12, "--batch-size", 3, "--lr", 2e-2, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "computing reference log-probabilities of 12 preference pairs" in r.stderr
    r = _cli("train", bundle, "--data", data, "--steps", 12, "--batch-size", 3, "--lr", 2e-2, "--quiet", "--restart")
    assert r.returncode == 0 and "computing reference" not in r.stderr, r.stderr  # --restart keeps the cache
    r = _cli("eval", bundle, "--data", _write(tmp_path / "held.jsonl"), "--json")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    on, off = ev["with_adapter"], ev["without_adapter"]
    assert ev["task"] == "dpo" and on["margin"] > 0 and on["accuracy"] > off["accuracy"] and on["loss"] < off["loss"]
    assert abs(off["margin"]) < 1e-4 and off["loss"] == pytest.approx(np.log(2), abs=1e-4)  # adapter off = reference
    cached = sorted((bundle / "train-state").glob("reference-*.npy"))
    assert len(cached) == 2  # training data and held-out data, each computed once
    r = _cli("delta", bundle, "--out", tmp_path / "d.etd", "--codec", "fp32")
    assert r.returncode == 0, r.stderr
    r = _cli("to-peft", tmp_path / "d.etd", "--bundle", bundle, "--out", tmp_path / "peft")
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(bundle)
    trained = load_file(str(bundle / "train-state" / "ckpt-00000012" / "adapter.safetensors"))
    peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    for t in manifest.trainable:
        np.testing.assert_array_equal(peft[t.peft_key], trained[t.graph_name])


def test_beta_only_with_dpo(tiny_model_dir, tmp_path):
    r = _cli("export", tiny_model_dir, "--beta", "0.2", "--out", tmp_path / "b", "--quantize", "none")
    assert r.returncode == 2 and "--task dpo" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_resume_after_kill_matches_uninterrupted_run(bundle, tmp_path):
    """kill -9 mid-run, --resume: the cached reference log-probabilities are reused and the final
    adapter equals an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.numpy import load_file

    data = _write(tmp_path / "p.jsonl", repeat=8)
    args = ["--data", data, "--steps", 30, "--batch-size", 2, "--lr", 1e-2, "--save-every", 4, "--quiet"]
    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    assert _cli("train", other, *args).returncode == 0
    latest = bundle / "train-state" / "LATEST"
    proc = subprocess.Popen([sys.executable, "-m", "edgetune.cli", "train", str(bundle), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and int(latest.read_text().strip().split("-")[1]) >= 8:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed; make the run longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = _cli("train", bundle, *args, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming from step" in r.stderr and "computing reference" not in r.stderr  # the cache was used
    final = load_file(str(bundle / "train-state" / "ckpt-00000030" / "adapter.safetensors"))
    reference = load_file(str(other / "train-state" / "ckpt-00000030" / "adapter.safetensors"))
    for key in reference:
        np.testing.assert_allclose(final[key], reference[key], rtol=1e-5, atol=1e-6)
