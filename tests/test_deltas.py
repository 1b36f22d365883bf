"""Deltas end to end on a tiny model: CLI round trips, PEFT compatibility, codecs, refusals, merge."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgetune.bundle import Bundle, read_manifest


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgetune.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tiny_bundle, tmp_path_factory) -> tuple[Path, dict]:
    """A bundle copy whose training state holds a random, clearly non-zero adapter (by graph name)."""
    from edgetune.runtime.adapter_source import initial_adapter
    from edgetune.runtime.import_adapter import import_adapter

    bundle = tmp_path_factory.mktemp("trained") / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    manifest = read_manifest(bundle)
    rng = np.random.default_rng(7)
    adapter = {k: (v + rng.normal(0, 0.2, v.shape)).astype(np.float32) for k, v in initial_adapter(Bundle.open(bundle)).items()}
    import_adapter(Bundle.open(bundle), adapter, "test adapter")
    return bundle, adapter


def _logits_onnx(bundle, adapter, batch):
    from edgetune.runtime.generate import Generator

    return Generator(Bundle.open(bundle)).logits(batch["input_ids"], batch["attention_mask"], adapter)


def _batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(2, 10), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_to_peft_loads_in_peft_and_matches_logits(trained, tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    bundle, adapter = trained
    assert _cli("delta", bundle, "--out", tmp_path / "d.etd", "--codec", "fp32").returncode == 0
    r = _cli("to-peft", tmp_path / "d.etd", "--bundle", bundle, "--out", tmp_path / "peft")
    assert r.returncode == 0, r.stderr
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager", dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]
    manifest = read_manifest(bundle)
    batch = _batch(manifest.base_model["config"]["vocab_size"])
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"])).logits.numpy()
    ours = _logits_onnx(bundle, adapter, batch)
    assert np.abs(ours - ref).max() <= 1e-3
    # and the adapter really matters: the base model's logits differ
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=torch.tensor(batch["input_ids"])).logits.numpy()
    assert np.abs(plain - ref).max() > 1e-2


def test_from_peft_imports_a_peft_saved_adapter(tiny_bundle, tiny_model_dir, tmp_path):
    import torch

    from edgetune.runtime.adapter_source import latest_adapter
    from tests.reference import peft_model

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    manifest = read_manifest(bundle)
    model = peft_model(tiny_model_dir, manifest)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "server-adapter")  # PEFT's own writer
    r = _cli("from-peft", tmp_path / "server-adapter", "--bundle", bundle)
    assert r.returncode == 0, r.stderr
    got = latest_adapter(Bundle.open(bundle)).tensors
    from peft import get_peft_model_state_dict

    saved = {k: v.numpy() for k, v in get_peft_model_state_dict(model).items()}
    for t in manifest.trainable:
        np.testing.assert_array_equal(got[t.graph_name], saved[t.peft_key])
    r = _cli("train", bundle, "--data", _pairs(tmp_path), "--steps", 2, "--quiet")  # training starts from it
    assert r.returncode == 0, r.stderr


def _pairs(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"instruction": "Say hi.", "output": "hi"}\n' * 4)
    return p


@pytest.mark.parametrize("codec, bound", [("fp32", 0.0), ("fp16", 1e-3), ("int8", 1e-2)])
def test_codecs_keep_the_adapter_effect(trained, tmp_path, codec, bound):
    from edgetune.delta import read_delta
    from edgetune.runtime.evaluate import evaluate

    bundle, adapter = trained
    path = tmp_path / f"d-{codec}.etd"
    assert _cli("delta", bundle, "--out", path, "--codec", codec).returncode == 0
    manifest = read_manifest(bundle)
    decoded = {t.graph_name: read_delta(path).tensors[t.peft_key] for t in manifest.trainable}
    if codec == "fp32":
        for k in adapter:
            np.testing.assert_array_equal(decoded[k], adapter[k])
    data = _pairs(tmp_path)
    full = evaluate(Bundle.open(bundle), data, adapter=adapter)["with_adapter"]["loss"]
    coded = evaluate(Bundle.open(bundle), data, adapter=decoded)["with_adapter"]["loss"]
    assert abs(coded - full) <= max(bound, 0.0) * full + 1e-7  # int8: within 1 % of fp32 (stated bound 1e-2)
    r = _cli("delta", "inspect", path)
    assert r.returncode == 0 and codec in r.stdout, r.stderr


def test_delta_for_other_base_or_rank_is_refused(trained, export_tiny, tmp_path, tiny_model_dir):
    bundle, _ = trained
    assert _cli("delta", bundle, "--out", tmp_path / "d.etd").returncode == 0
    other_rank = export_tiny(quantize="none", rank=4)
    r = _cli("to-peft", tmp_path / "d.etd", "--bundle", other_rank, "--out", tmp_path / "p")
    assert r.returncode == 2 and "rank" in r.stderr and "8" in r.stderr and "4" in r.stderr, r.stderr
    from tests.tiny_model import build_tiny_model_dir

    other_model = build_tiny_model_dir(tmp_path / "other-model", seed=1)
    other = tmp_path / "other-bundle"
    assert _cli("export", other_model, "--quantize", "none", "--out", other).returncode == 0
    r = _cli("to-peft", tmp_path / "d.etd", "--bundle", other, "--out", tmp_path / "p")
    ours, theirs = read_manifest(bundle).base_sha256, read_manifest(other).base_sha256
    assert r.returncode == 2 and ours[:12] in r.stderr and theirs[:12] in r.stderr, r.stderr
    assert not (tmp_path / "p").exists()


def test_signed_delta_verifies_and_tampering_fails(trained, tmp_path):
    bundle, _ = trained
    assert _cli("keygen", "--out", tmp_path / "device.key").returncode == 0
    path = tmp_path / "s.etd"
    assert _cli("delta", bundle, "--out", path, "--sign", tmp_path / "device.key").returncode == 0
    r = _cli("delta", "inspect", path, "--trusted-key", tmp_path / "device.key.pub")
    assert r.returncode == 0 and "valid" in r.stdout, r.stderr
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "t.etd").write_bytes(bytes(data))
    r = _cli("delta", "inspect", tmp_path / "t.etd", "--trusted-key", tmp_path / "device.key.pub")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert _cli("keygen", "--out", tmp_path / "other.key").returncode == 0
    r = _cli("to-peft", path, "--bundle", bundle, "--out", tmp_path / "p", "--trusted-key", tmp_path / "other.key.pub")
    assert r.returncode == 2 and not (tmp_path / "p").exists()


def test_since_ships_difference_and_reconstructs(trained, tmp_path):
    from edgetune.delta import read_delta

    bundle, adapter = trained
    assert _cli("delta", bundle, "--out", tmp_path / "global.etd", "--codec", "fp32").returncode == 0
    assert _cli("delta", bundle, "--out", tmp_path / "diff.etd", "--codec", "fp32", "--since", tmp_path / "global.etd").returncode == 0
    d = read_delta(tmp_path / "diff.etd")
    assert d.kind == "diff" and all(np.abs(v).max() == 0 for v in d.tensors.values())
    r = _cli("to-peft", tmp_path / "diff.etd", "--bundle", bundle, "--out", tmp_path / "p")
    assert r.returncode == 2 and "--since" in r.stderr
    r = _cli("to-peft", tmp_path / "diff.etd", "--bundle", bundle, "--out", tmp_path / "p", "--since", tmp_path / "global.etd")
    assert r.returncode == 0, r.stderr


def test_merge_folds_adapter_into_inference_graph(trained, tmp_path):
    import onnxruntime as ort

    bundle, adapter = trained
    assert _cli("delta", bundle, "--out", tmp_path / "d.etd", "--codec", "fp32").returncode == 0
    r = _cli("merge", bundle, "--adapter", tmp_path / "d.etd", "--out", tmp_path / "merged.onnx")
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(bundle)
    batch = _batch(manifest.base_model["config"]["vocab_size"], seed=3)
    want = _logits_onnx(bundle, adapter, batch)
    session = ort.InferenceSession(str(tmp_path / "merged.onnx"))
    names = {i.name for i in session.get_inputs()}
    assert not names & set(manifest.generation.adapter_inputs)
    info = manifest.generation
    past = np.zeros((2, info.num_kv_heads, 0, info.head_dim), np.float32)  # empty cache
    feed = {**batch, "position_ids": np.tile(np.arange(10), (2, 1)), **{name: past for name in info.past_inputs}}
    got = session.run(["logits"], {k: v for k, v in feed.items() if k in names})[0]
    assert np.abs(got - want).max() <= 1e-4


def test_all_linear_with_patterns_round_trips_through_peft(export_tiny, tiny_model_dir, tmp_path):
    """to-peft of an all-linear bundle with rank/alpha patterns: PEFT loads it with no key warnings and
    gives the bundle's logits; PEFT's own save of it imports back unchanged; merge folds each layer's scaling."""
    import json

    import onnxruntime as ort
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgetune.runtime.adapter_source import initial_adapter, latest_adapter
    from edgetune.runtime.import_adapter import import_adapter

    bundle = tmp_path / "b"
    shutil.copytree(export_tiny(quantize="none", targets=("all-linear",), rank_pattern={"down_proj": 16, "o_proj": 2},
                                alpha_pattern={r"layers\.0\..*_proj": 4}), bundle)
    manifest = read_manifest(bundle)
    rng = np.random.default_rng(3)
    adapter = {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in initial_adapter(Bundle.open(bundle)).items()}
    import_adapter(Bundle.open(bundle), adapter, "test adapter")
    assert _cli("delta", bundle, "--out", tmp_path / "d.etd", "--codec", "fp32").returncode == 0
    r = _cli("to-peft", tmp_path / "d.etd", "--bundle", bundle, "--out", tmp_path / "peft")
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == "all-linear" and config["rank_pattern"] == {"down_proj": 16, "o_proj": 2}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager", dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert not [w for w in caught if "key" in str(w.message).lower()], [str(w.message) for w in caught]
    assert len([n for n, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A]) == 2 * 7
    batch = _batch(manifest.base_model["config"]["vocab_size"])
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"])).logits.numpy()
    ours = _logits_onnx(bundle, adapter, batch)
    assert np.abs(ours - ref).max() <= 1e-3
    # PEFT's own writer (target_modules resolved to module names) imports back as the same tensors
    model.save_pretrained(tmp_path / "resaved")
    fresh = tmp_path / "b2"
    shutil.copytree(export_tiny(quantize="none", targets=("all-linear",), rank_pattern={"down_proj": 16, "o_proj": 2},
                                alpha_pattern={r"layers\.0\..*_proj": 4}), fresh)
    r = _cli("from-peft", tmp_path / "resaved", "--bundle", fresh)
    assert r.returncode == 0, r.stderr
    got = latest_adapter(Bundle.open(fresh)).tensors
    for name in adapter:
        np.testing.assert_array_equal(got[name], adapter[name])
    # a PEFT folder with another alpha for one layer is refused, naming the layer
    changed = json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())
    changed["alpha_pattern"] = {}
    (tmp_path / "resaved" / "adapter_config.json").write_text(json.dumps(changed))
    r = _cli("from-peft", tmp_path / "resaved", "--bundle", fresh, "--force")
    assert r.returncode == 2 and "layers.0" in r.stderr and "lora_alpha" in r.stderr, r.stderr
    # merge applies each layer's own scaling
    r = _cli("merge", bundle, "--out", tmp_path / "merged.onnx")
    assert r.returncode == 0, r.stderr
    session = ort.InferenceSession(str(tmp_path / "merged.onnx"))
    names = {i.name for i in session.get_inputs()}
    info = manifest.generation
    past = np.zeros((2, info.num_kv_heads, 0, info.head_dim), np.float32)
    feed = {**batch, "position_ids": np.tile(np.arange(10), (2, 1)), **{name: past for name in info.past_inputs}}
    assert np.abs(session.run(["logits"], {k: v for k, v in feed.items() if k in names})[0] - ours).max() <= 1e-4
