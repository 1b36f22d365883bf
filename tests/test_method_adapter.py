"""Bottleneck adapters (``--method adapter``) against AdapterHub ``adapters``: one AdamW step, the
saved-adapter round trip, adapter off, and the whole device cycle through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgetune.bundle import Bundle, read_manifest
from edgetune.methods import AdapterConfig
from tests.test_export import _batch, _ort_step, _rel

pytest.importorskip("adapters")
RTOL = 1e-4
METHOD = "adapter"
CONFIGS = {
    "both-swish-dim8": AdapterConfig(dim=8),
    "mlp-relu-rf16": AdapterConfig(reduction_factor=16, where=("mlp",), non_linearity="relu"),
    "attn-tanh-dim4": AdapterConfig(dim=4, where=("attn",), non_linearity="tanh"),
    "mlp-gelu-dim4": AdapterConfig(dim=4, where=("mlp",), non_linearity="gelu"),
}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgetune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def hub_model(model_dir, manifest, tensors: dict[str, np.ndarray] | None = None):
    """The tiny base with an AdapterHub bottleneck adapter of the bundle's config; ``tensors`` by peft key."""
    import adapters
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    adapters.init(model)
    hub = manifest.method["peft_config"]
    model.add_adapter(hub["name"], config=adapters.AdapterConfig.load(hub["config"]))
    model.train_adapter(hub["name"])  # freezes the base, activates the adapter
    if tensors is not None:
        state = model.state_dict()
        missing = sorted(set(tensors) - set(state))
        assert not missing, missing[:3]
        assert {k for k in state if ".adapters." in k} == set(tensors)
        with torch.no_grad():
            for k, v in tensors.items():
                state[k].copy_(torch.tensor(v))
    return model


def hub_adamw_step(model, batch, lr, optimizer):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(optimizer["betas"]), eps=optimizer["eps"],
                            weight_decay=optimizer["weight_decay"])
    model.train()
    out = model(**{k: torch.tensor(v) for k, v in batch.items()})  # transformers' shifted CE, ignore -100
    out.loss.backward()
    opt.step()
    return float(out.loss.detach()), {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if ".adapters." in k}


def _random_start(bundle, seed=1):
    from edgetune.runtime.adapter_source import initial_adapter

    rng = np.random.default_rng(seed)  # up != 0, so down gets a gradient too
    return {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in initial_adapter(Bundle.open(bundle)).items()}


@pytest.mark.parametrize("recompute", ["cheap", "full"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_adamw_step_matches_adapterhub(export_tiny, tiny_model_dir, name, recompute):
    bundle = export_tiny(quantize="none", method="adapter", method_config=CONFIGS[name], recompute=recompute)
    manifest = read_manifest(bundle)
    memory = manifest.producer["memory"]
    assert memory["loss_chunks"] == 8 and memory["recomputed_segments"] >= 3  # 2 layers x (attention, MLP) blocks,
    assert all("no gradient" in s for s in memory["skipped"])  # but layer 0's attention needs no backward on mlp-only
    batch, lr = _batch(manifest), 1e-3
    loss, before, after = _ort_step(bundle, manifest, batch, lr, _random_start(bundle))
    model = hub_model(tiny_model_dir, manifest, {t.peft_key: before[t.graph_name] for t in manifest.trainable})
    ref_loss, ref_after = hub_adamw_step(model, batch, lr, manifest.optimizer)
    assert abs(loss - ref_loss) <= RTOL * abs(ref_loss)
    for t in manifest.trainable:
        assert _rel(after[t.graph_name], ref_after[t.peft_key]) <= RTOL, t.peft_key
        assert not np.allclose(after[t.graph_name], before[t.graph_name]), t.peft_key  # the step moved it


def test_exported_adapter_starts_as_the_base_model(export_tiny, tiny_model_dir):
    """up = 0 at export: the generation graph with the initial adapter gives the base model's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgetune.runtime.adapter_source import initial_adapter
    from edgetune.runtime.generate import Generator

    bundle = export_tiny(quantize="none", method="adapter", method_config=CONFIGS["both-swish-dim8"])
    manifest = read_manifest(bundle)
    initial = initial_adapter(Bundle.open(bundle))
    ups = [t.graph_name for t in manifest.trainable if ".adapter_up" in t.graph_name]
    assert ups and all(not initial[n].any() for n in ups)
    assert all(initial[t.graph_name].any() for t in manifest.trainable if t.graph_name.endswith("adapter_down"))
    ids = np.random.default_rng(0).integers(3, manifest.base_model["config"]["vocab_size"], size=(2, 9))
    got = Generator(Bundle.open(bundle)).logits(ids, np.ones_like(ids), initial)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        want = base(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_config_refuses_bad_values_all_at_once():
    from edgetune.errors import EdgetuneError

    with pytest.raises(EdgetuneError) as info:
        AdapterConfig(dim=8, reduction_factor=4, where=("mlp", "ffn"), non_linearity="elu")
    text = str(info.value)
    assert "not both" in text and "'ffn'" in text and "'elu'" in text


def test_non_linearity_option_reaches_the_manifest_and_the_adapterhub_config(tiny_model_dir, tmp_path):
    bundle = tmp_path / "b"
    r = _cli("export", tiny_model_dir, "--method", "adapter", "--adapter-dim", "4", "--adapter-non-linearity", "relu",
             "--quantize", "none", "--out", bundle)
    assert r.returncode == 0, r.stderr
    method = read_manifest(bundle).method
    assert method["config"]["non_linearity"] == "relu"
    assert method["peft_config"]["config"]["non_linearity"] == "relu"  # what to-peft writes for AdapterHub
    r = _cli("export", tiny_model_dir, "--method", "adapter", "--adapter-non-linearity", "elu", "--out", tmp_path / "c")
    assert r.returncode == 2 and "'elu'" in r.stderr and "tanh" in r.stderr and "Traceback" not in r.stderr
    r = _cli("export", tiny_model_dir, "--method", "lora", "--adapter-non-linearity", "relu", "--out", tmp_path / "d")
    assert r.returncode == 2 and "--adapter-non-linearity" in r.stderr and "Traceback" not in r.stderr


def test_device_cycle_through_the_cli(tiny_model_dir, tmp_path):
    """export -> train -> delta -> to-peft (AdapterHub layout) -> adapters loads it with the generation
    graph's logits -> from-peft back into a fresh bundle -> generate with it."""
    import adapters
    import torch
    from transformers import AutoModelForCausalLM

    from edgetune.runtime.adapter_source import latest_adapter
    from edgetune.runtime.generate import Generator

    bundle = tmp_path / "b"
    r = _cli("export", tiny_model_dir, "--method", "adapter", "--adapter-dim", "8", "--adapter-where", "mlp,attn",
             "--quantize", "none", "--out", bundle)
    assert r.returncode == 0, r.stderr
    assert "adapter dim=8 (swish) after mlp,attn" in r.stdout
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {w}", "output": f"{w} {w} {w}"}) + "\n"
                            for w in ("one", "two", "three", "four", "five", "six")))
    r = _cli("train", bundle, "--data", data, "--steps", "4", "--batch-size", "2", "--lr", "1e-2", "--threads", "1")
    assert r.returncode == 0, r.stderr
    r = _cli("delta", bundle, "--out", tmp_path / "u.etd", "--codec", "fp32")
    assert r.returncode == 0, r.stderr
    r = _cli("to-peft", tmp_path / "u.etd", "--bundle", bundle, "--out", tmp_path / "hub")
    assert r.returncode == 0 and "load_adapter" in r.stdout, r.stderr
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == ["adapter.safetensors", "adapter_config.json"]

    trained = latest_adapter(Bundle.open(bundle)).tensors
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager", dtype=torch.float32)
    adapters.init(model)
    name = model.load_adapter(str(tmp_path / "hub"), use_safetensors=True, set_active=True)
    model.eval()
    ids = np.random.default_rng(3).integers(3, 200, size=(2, 11))
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids)).logits.numpy()
    got = Generator(Bundle.open(bundle)).logits(ids, np.ones_like(ids), trained)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    # the same folder saved by AdapterHub itself imports into a fresh bundle
    model.save_adapter(str(tmp_path / "hub-saved"), name, use_safetensors=True)
    fresh = tmp_path / "fresh"
    r = _cli("export", tiny_model_dir, "--method", "adapter", "--adapter-dim", "8", "--quantize", "none", "--out", fresh)
    assert r.returncode == 0, r.stderr
    r = _cli("from-peft", tmp_path / "hub-saved", "--bundle", fresh)
    assert r.returncode == 0, r.stderr
    imported = latest_adapter(Bundle.open(fresh)).tensors
    for t in read_manifest(fresh).trainable:
        np.testing.assert_allclose(imported[t.graph_name], trained[t.graph_name], rtol=0, atol=0)
    r = _cli("generate", fresh, "--prompt", "say two", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    r = _cli("eval", fresh, "--data", data)
    assert r.returncode == 0, r.stderr


def test_folder_for_another_config_is_refused(export_tiny, tmp_path):
    from edgetune.errors import DeltaError
    from edgetune.peft_io import read_peft_adapter, write_peft_adapter
    from edgetune.runtime.adapter_source import initial_adapter

    bundle = export_tiny(quantize="none", method="adapter", method_config=CONFIGS["both-swish-dim8"])
    other = export_tiny(quantize="none", method="adapter", method_config=CONFIGS["mlp-relu-rf16"])
    manifest = read_manifest(bundle)
    adapter = initial_adapter(Bundle.open(bundle))
    write_peft_adapter(tmp_path / "hub", manifest, {t.peft_key: adapter[t.graph_name] for t in manifest.trainable})
    with pytest.raises(DeltaError) as info:
        read_peft_adapter(tmp_path / "hub", read_manifest(other))
    text = str(info.value)
    assert "AdapterHub" in text and "mh_adapter" in text and "non_linearity" in text and "unexpected tensors" in text


@pytest.mark.parametrize("name", list(CONFIGS))
def test_portable_graph_gives_the_training_backends_loss_and_gradients(export_tiny, name):
    """The stock-onnxruntime graph (edgetune/export/portable/) covers this method's operators."""
    from tests.test_portable_graph import assert_portable_matches_training

    bundle = export_tiny(quantize="int8", method=METHOD, method_config=CONFIGS[name])
    assert_portable_matches_training(bundle, _batch(read_manifest(bundle)))
