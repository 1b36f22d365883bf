"""`export --freeze-a` (FFA-LoRA): A fixed at its seeded init and stored in the bundle, only B trained
and shipped; one AdamW step equals PyTorch+PEFT with lora_A.requires_grad=False; the PEFT round trip
still carries lora_A."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgetune.bundle import Bundle, read_manifest
from tests.reference import peft_model

RTOL = 1e-4


def _batch(manifest, batch=2, seq=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, manifest.base_model["config"]["vocab_size"], size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.copy()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgetune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def ffa(export_tiny):
    return export_tiny(quantize="none", freeze_a=True)


def test_only_b_is_trainable_and_a_is_the_seeded_init(ffa, tiny_bundle):
    from edgetune.fixed_adapter import read_fixed
    from edgetune.runtime.adapter_source import initial_adapter

    m, plain = read_manifest(ffa), read_manifest(tiny_bundle)
    assert m.method["config"]["freeze_a"] is True and "freeze_a" not in plain.method["config"]
    assert [t.peft_key for t in m.trainable] == [t.peft_key for t in plain.trainable if ".lora_B." in t.peft_key]
    fixed = read_fixed(ffa, m)
    assert sorted(fixed) == sorted(t.graph_name for t in plain.trainable if t.graph_name.endswith(".lora_A"))
    # the same seed gives the same A as a plain export's initial A, kept bit for bit
    start = initial_adapter(Bundle.open(tiny_bundle))
    for name, value in fixed.items():
        np.testing.assert_array_equal(value, start[name])
    assert "fixed_adapter.safetensors" in m.files  # hashed like every artifact
    # the training graph's own copy (a frozen parameter of the ORT checkpoint) holds the same values
    from onnxruntime.training.api import CheckpointState

    state = CheckpointState.load_checkpoint(str(ffa / "checkpoint"))
    for name, value in fixed.items():
        np.testing.assert_array_equal(np.array(state.parameters[name].data), value)


def test_int8_export_keeps_a_exact(export_tiny):
    m = read_manifest(export_tiny(quantize="int8", freeze_a=True))
    a = [t for t in m.frozen if ".lora_A" in t.graph_name]
    assert a and all(t.quantization == "none" for t in a)
    assert any(t.quantization != "none" for t in m.frozen)


def test_one_adamw_step_matches_peft_with_a_frozen(ffa, tiny_model_dir):
    """B != 0 at the start, so A would get a gradient if it were trainable: it must not move."""
    from edgetune.fixed_adapter import read_fixed_peft
    from edgetune.runtime.adapter_source import initial_adapter
    from edgetune.runtime.backend import open_backend
    from tests.reference import peft_adamw_step

    m = read_manifest(ffa)
    batch, lr = _batch(m), 1e-3
    rng = np.random.default_rng(1)
    start = {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in initial_adapter(Bundle.open(ffa)).items()}
    backend = open_backend("ort-training", Bundle.open(ffa))
    backend.set_trainable(start)
    loss = backend.train_step(batch)
    backend.optimizer_step(lr)
    after = backend.trainable()

    fixed = read_fixed_peft(ffa, m)
    model = peft_model(tiny_model_dir, m, {**fixed, **{t.peft_key: start[t.graph_name] for t in m.trainable}})
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)
    ref_loss, ref_after = peft_adamw_step(model, batch, lr, m.optimizer)
    assert abs(loss - ref_loss) <= RTOL * abs(ref_loss)
    for t in m.trainable:
        ref = ref_after[t.peft_key]
        assert np.abs(after[t.graph_name] - ref).max() <= RTOL * np.abs(ref).max(), t.peft_key
        assert not np.allclose(after[t.graph_name], start[t.graph_name])
    for key, value in fixed.items():  # PEFT's A did not move either
        np.testing.assert_array_equal(ref_after[key], value)


def test_delta_carries_b_only_and_the_peft_round_trip_has_a(ffa, tiny_bundle, tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgetune.delta import read_delta
    from edgetune.fixed_adapter import read_fixed_peft
    from edgetune.runtime.backend import open_backend

    bundle = tmp_path / "b"
    shutil.copytree(ffa, bundle)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n" for w in ("yes", "no", "hi")))
    assert _cli("train", bundle, "--data", data, "--steps", 3, "--batch-size", 3, "--lr", "1e-2", "--quiet").returncode == 0
    r = _cli("delta", bundle, "--out", tmp_path / "u.etd", "--codec", "fp32")
    assert r.returncode == 0, r.stderr
    plain = tmp_path / "plain"
    shutil.copytree(tiny_bundle, plain)
    assert _cli("delta", plain, "--out", tmp_path / "p.etd", "--codec", "fp32").returncode == 0
    m = read_manifest(bundle)
    delta, full = read_delta(tmp_path / "u.etd"), read_delta(tmp_path / "p.etd")
    assert sorted(delta.tensors) == sorted(t.peft_key for t in m.trainable)
    assert all(".lora_B." in k for k in delta.tensors)
    b_bytes = sum(delta.payload_sizes.values())
    a_bytes = sum(v for k, v in full.payload_sizes.items() if ".lora_A." in k)
    assert b_bytes == sum(full.payload_sizes.values()) - a_bytes  # exactly A's bytes are not shipped

    r = _cli("to-peft", tmp_path / "u.etd", "--bundle", bundle, "--out", tmp_path / "peft")
    assert r.returncode == 0, r.stderr
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path / "peft")
    state = {k: v for k, v in model.state_dict().items() if "lora_A" in k}
    fixed = read_fixed_peft(bundle, m)
    assert len(state) == len(fixed)
    for key, value in fixed.items():
        np.testing.assert_array_equal(state[key.replace(".lora_A.weight", ".lora_A.default.weight")].numpy(), value)
    batch = _batch(m, seed=3)
    model.eval()
    with torch.no_grad():
        ref = float(model(**{k: torch.tensor(v) for k, v in batch.items()}).loss)
    backend = open_backend("ort-training", Bundle.open(bundle), with_eval=True, training=False)
    backend.set_trainable({t.graph_name: delta.tensors[t.peft_key] for t in m.trainable})
    assert abs(backend.eval_loss(batch) - ref) <= RTOL * abs(ref)

    # from-peft takes the folder back; a folder whose A differs is refused by name
    r = _cli("from-peft", tmp_path / "peft", "--bundle", bundle, "--force")
    assert r.returncode == 0, r.stderr
    from safetensors.numpy import load_file, save_file

    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(weights))
    r = _cli("from-peft", tmp_path / "peft", "--bundle", bundle, "--force")
    assert r.returncode == 2 and "not the bundle's fixed value" in r.stderr and r.stderr.count("\n") == 1


def test_generate_and_merge_use_the_fixed_a(ffa, tmp_path):
    """The generation graph takes A as an input fed from the bundle: B = 0 gives the base model."""
    from edgetune.fixed_adapter import read_fixed
    from edgetune.runtime.adapter_source import disabled, initial_adapter
    from edgetune.runtime.generate import Generator

    m = read_manifest(ffa)
    gen = Generator(Bundle.open(ffa))
    batch = _batch(m)
    rng = np.random.default_rng(2)
    trained = {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in initial_adapter(Bundle.open(ffa)).items()}
    with_b = gen.logits(batch["input_ids"], batch["attention_mask"], trained)
    off = gen.logits(batch["input_ids"], batch["attention_mask"], disabled(Bundle.open(ffa), trained))
    assert not np.allclose(with_b, off)
    assert set(read_fixed(ffa, m)) <= set(m.generation.adapter_inputs.values())
    bundle = tmp_path / "b"
    shutil.copytree(ffa, bundle)
    from edgetune.merge import merge_adapter

    merge_adapter(bundle, m, trained, tmp_path / "merged.onnx")
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "merged.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "position_ids" in names:
        feeds["position_ids"] = np.broadcast_to(np.arange(batch["input_ids"].shape[1]), batch["input_ids"].shape).astype(np.int64)
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((batch["input_ids"].shape[0], m.generation.num_kv_heads, 0, m.generation.head_dim),
                                     np.float32)
    merged = session.run(["logits"], feeds)[0]
    real = batch["attention_mask"].astype(bool)  # padded positions' logits mean nothing
    np.testing.assert_allclose(merged[real], with_b[real], rtol=1e-4, atol=1e-4)
