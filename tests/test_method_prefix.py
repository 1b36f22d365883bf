"""Prefix tuning (``--method prefix``) against PEFT's prefix tuning: one AdamW step (with and without
the reparameterisation MLP, memory plan on), the PEFT folder's logits against the generation graph,
adapter off, and the whole device cycle through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgetune.bundle import Bundle, read_manifest
from edgetune.methods import PrefixConfig
from tests.test_export import _batch, _ort_step, _rel

RTOL = 1e-4
METHOD = "prefix"
CONFIGS = {"m4": PrefixConfig(num_virtual_tokens=4), "m3-projection24": PrefixConfig(num_virtual_tokens=3, projection=24)}
# PEFT's PrefixEncoder parameter -> our role
PEFT_PARAMS = {"embedding.weight": "embedding", "transform.0.weight": "transform_in", "transform.0.bias": "transform_in_bias",
               "transform.2.weight": "transform_out", "transform.2.bias": "transform_out_bias"}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgetune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def peft_prefix_model(model_dir, manifest, tensors: dict[str, np.ndarray]):
    """The tiny base with PEFT's prefix tuning of the bundle's config, holding ``tensors`` (by role)."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = manifest.method["config"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    peft_cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg["num_virtual_tokens"],
                                  prefix_projection=bool(cfg["projection"]), encoder_hidden_size=cfg["projection"] or None)
    model = get_peft_model(base, peft_cfg)
    encoder = model.prompt_encoder["default"]
    params = {"embedding.weight": tensors["prompt_embeddings"]} if not cfg["projection"] else \
        {k: tensors[role] for k, role in PEFT_PARAMS.items()}
    state = encoder.state_dict()
    assert set(params) == set(state), (sorted(params), sorted(state))
    with torch.no_grad():
        for k, v in params.items():
            assert tuple(state[k].shape) == v.shape, k
            state[k].copy_(torch.tensor(v))
    return model


def _roles(manifest, tensors):
    return {t.graph_name.rsplit(".", 1)[-1]: tensors[t.graph_name] for t in manifest.trainable}


@pytest.mark.parametrize("recompute", ["cheap", "full"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_adamw_step_matches_peft(export_tiny, tiny_model_dir, name, recompute):
    import torch

    bundle = export_tiny(quantize="none", method="prefix", method_config=CONFIGS[name], recompute=recompute)
    manifest = read_manifest(bundle)
    memory = manifest.producer["memory"]
    assert memory["recomputed_segments"] == 4 and memory["loss_chunks"] == 8 and not memory["skipped"]
    batch, lr = _batch(manifest), 1e-3
    loss, before, after = _ort_step(bundle, manifest, batch, lr, None)
    model = peft_prefix_model(tiny_model_dir, manifest, _roles(manifest, before))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(manifest.optimizer["betas"]), eps=manifest.optimizer["eps"],
                            weight_decay=manifest.optimizer["weight_decay"])
    model.train()
    out = model(**{k: torch.tensor(v) for k, v in batch.items()})
    out.loss.backward()
    opt.step()
    assert abs(loss - float(out.loss.detach())) <= RTOL * abs(float(out.loss.detach()))
    state = {k: v.detach().numpy() for k, v in model.prompt_encoder["default"].state_dict().items()}
    want = {"prompt_embeddings": state["embedding.weight"]} if not manifest.method["config"]["projection"] else \
        {role: state[k] for k, role in PEFT_PARAMS.items()}
    got = _roles(manifest, after)
    assert set(got) == set(want)
    for role in want:
        assert _rel(got[role], want[role]) <= RTOL, role
        assert not np.allclose(got[role], _roles(manifest, before)[role]), role  # the step moved it


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_folder_gives_the_generation_graphs_logits(export_tiny, tiny_model_dir, tmp_path, name):
    """to-peft's folder (projection folded) loads in PeftModel.from_pretrained and gives the generation
    graph's logits (prefix fed as the initial cache) within 1e-4."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgetune.delta import write_delta
    from edgetune.runtime.adapter_source import initial_adapter
    from edgetune.runtime.generate import Generator

    bundle = export_tiny(quantize="none", method="prefix", method_config=CONFIGS[name])
    manifest = read_manifest(bundle)
    rng = np.random.default_rng(5)
    adapter = {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in initial_adapter(Bundle.open(bundle)).items()}
    write_delta(tmp_path / "d.etd", {t.peft_key: adapter[t.graph_name] for t in manifest.trainable},
                base_model_sha256=manifest.base_sha256, method={"name": "prefix", "config": manifest.method["config"]},
                codec="fp32")
    r = _cli("to-peft", tmp_path / "d.etd", "--bundle", bundle, "--out", tmp_path / "peft")
    assert r.returncode == 0, r.stderr
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    ids = rng.integers(3, manifest.base_model["config"]["vocab_size"], size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    with torch.no_grad():
        want = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = Generator(Bundle.open(bundle)).logits(ids, mask, adapter)
    keep = mask.astype(bool)
    np.testing.assert_allclose(got[keep], want[keep], rtol=1e-4, atol=1e-4)


def test_adapter_off_is_the_base_model_in_training_and_generation_graphs(export_tiny, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from edgetune.runtime.adapter_source import disabled, initial_adapter
    from edgetune.runtime.backend import open_backend
    from edgetune.runtime.generate import Generator

    bundle = export_tiny(quantize="none", method="prefix", method_config=CONFIGS["m3-projection24"])
    opened = Bundle.open(bundle)
    manifest = opened.manifest
    off = disabled(opened, initial_adapter(opened))
    batch = _batch(manifest)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        out = base(**{k: torch.tensor(v) for k, v in batch.items()})
    backend = open_backend("ort-training", opened, with_eval=True, training=False)
    backend.set_trainable(off)
    assert abs(backend.eval_loss(batch) - float(out.loss)) <= 1e-4 * float(out.loss)
    got = Generator(opened).logits(batch["input_ids"], batch["attention_mask"], off)
    keep = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[keep], out.logits.numpy()[keep], rtol=1e-4, atol=1e-4)


def test_device_cycle_through_the_cli(tiny_model_dir, tmp_path):
    """export -> train -> delta -> to-peft -> from-peft into a fresh bundle (same tensors) -> generate."""
    from edgetune.runtime.adapter_source import latest_adapter

    bundle = tmp_path / "b"
    r = _cli("export", tiny_model_dir, "--method", "prefix", "--num-virtual-tokens", "4", "--quantize", "int8", "--out", bundle)
    assert r.returncode == 0, r.stderr
    assert "prefix m=4" in r.stdout
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {w}", "output": f"{w} {w} {w}"}) + "\n"
                            for w in ("one", "two", "three", "four", "five", "six")))
    r = _cli("train", bundle, "--data", data, "--steps", "4", "--batch-size", "2", "--lr", "1e-2", "--threads", "1")
    assert r.returncode == 0, r.stderr
    r = _cli("delta", bundle, "--out", tmp_path / "u.etd", "--codec", "fp32")
    assert r.returncode == 0, r.stderr
    r = _cli("to-peft", tmp_path / "u.etd", "--bundle", bundle, "--out", tmp_path / "peft")
    assert r.returncode == 0, r.stderr
    fresh = tmp_path / "fresh"
    r = _cli("export", tiny_model_dir, "--method", "prefix", "--num-virtual-tokens", "4", "--quantize", "int8", "--out", fresh)
    assert r.returncode == 0, r.stderr
    r = _cli("from-peft", tmp_path / "peft", "--bundle", fresh)
    assert r.returncode == 0, r.stderr
    trained, imported = latest_adapter(Bundle.open(bundle)).tensors, latest_adapter(Bundle.open(fresh)).tensors
    for t in read_manifest(fresh).trainable:
        np.testing.assert_array_equal(imported[t.graph_name], trained[t.graph_name])
    r = _cli("generate", fresh, "--prompt", "say two", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    r = _cli("eval", fresh, "--data", data)
    assert r.returncode == 0, r.stderr


def test_folded_prefix_cannot_start_a_projection_bundle(export_tiny, tmp_path):
    from edgetune.errors import DeltaError
    from edgetune.peft_io import read_peft_adapter, write_peft_adapter
    from edgetune.runtime.adapter_source import initial_adapter

    plain = export_tiny(quantize="none", method="prefix", method_config=PrefixConfig(num_virtual_tokens=3))
    projected = export_tiny(quantize="none", method="prefix", method_config=CONFIGS["m3-projection24"])
    manifest = read_manifest(plain)
    adapter = initial_adapter(Bundle.open(plain))
    write_peft_adapter(tmp_path / "p", manifest, {t.peft_key: adapter[t.graph_name] for t in manifest.trainable})
    assert set(read_peft_adapter(tmp_path / "p", manifest)) == {"prompt_embeddings"}
    with pytest.raises(DeltaError, match="reparameterisation MLP"):
        read_peft_adapter(tmp_path / "p", read_manifest(projected))


def test_cached_decoding_matches_full_forwards(export_tiny):
    """Greedy decoding with the prefix as initial cache picks what full forwards over the growing text pick."""
    from edgetune.runtime.adapter_source import initial_adapter
    from edgetune.runtime.generate import Generator

    bundle = export_tiny(quantize="none", method="prefix", method_config=CONFIGS["m4"])
    opened = Bundle.open(bundle)
    adapter = initial_adapter(opened)
    generator = Generator(opened)
    prompt = np.array([5, 9, 14, 3, 22], np.int64)
    new = generator.generate(prompt, adapter, max_new_tokens=5)
    assert len(new) == 5
    text = list(prompt)
    for token in new:
        ids = np.array([text], np.int64)
        assert int(np.argmax(generator.logits(ids, np.ones_like(ids), adapter)[0, -1])) == token
        text.append(int(token))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_portable_graph_gives_the_training_backends_loss_and_gradients(export_tiny, name):
    """The stock-onnxruntime graph (edgetune/export/portable/) covers this method's operators."""
    from tests.test_portable_graph import assert_portable_matches_training

    bundle = export_tiny(quantize="int8", method=METHOD, method_config=CONFIGS[name])
    assert_portable_matches_training(bundle, _batch(read_manifest(bundle)))


def test_init_option_reaches_the_manifest(tiny_model_dir, tmp_path):
    """--prefix-init random: PEFT's normal(0, 1) table; the default starts from real tokens' keys/values."""
    from edgetune.runtime.adapter_source import initial_adapter

    tables = {}
    for init in ("random", None):
        bundle = tmp_path / str(init)
        r = _cli("export", tiny_model_dir, "--method", "prefix", "--num-virtual-tokens", "4", "--quantize", "none",
                 *(["--prefix-init", init] if init else []), "--out", bundle)
        assert r.returncode == 0, r.stderr
        assert read_manifest(bundle).method["config"]["init"] == (init or "tokens")
        (tables[init],) = initial_adapter(Bundle.open(bundle)).values()
    assert abs(float(tables["random"].std()) - 1.0) < 0.2
    assert not np.allclose(tables["random"], tables[None])
