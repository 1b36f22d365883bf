"""--method full: every weight trainable in fp32; parity with plain PyTorch AdamW; deltas against the base."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgetune.bundle import Bundle, read_manifest
from tests.test_export import RTOL, _batch, _ort_step, _rel


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgetune.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def full_bundle(export_tiny):
    return export_tiny(method="full", quantize="none")


def _torch_adamw_step(model_dir, start: dict[str, np.ndarray], batch, lr, optimizer):
    """One plain PyTorch AdamW step on every parameter of the tiny model; returns (loss, {name: tensor})."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    params = dict(model.named_parameters())  # tied head: one entry, model.embed_tokens.weight
    assert set(params) == set(start)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.tensor(start[name]))
    opt = torch.optim.AdamW(params.values(), lr=lr, betas=tuple(optimizer["betas"]), eps=optimizer["eps"],
                            weight_decay=optimizer["weight_decay"])
    model.train()
    out = model(**{k: torch.tensor(v) for k, v in batch.items()})  # transformers' shifted CE, ignore -100
    out.loss.backward()
    opt.step()
    return float(out.loss.detach()), {k: p.detach().numpy().copy() for k, p in params.items()}


@pytest.mark.parametrize("recompute", ["cheap", "full"])
def test_one_adamw_step_matches_pytorch(export_tiny, tiny_model_dir, recompute):
    """Every weight (tied embedding/head included) after one step equals PyTorch AdamW's, memory plan on."""
    bundle = export_tiny(method="full", quantize="none", recompute=recompute)
    manifest = read_manifest(bundle)
    assert manifest.producer["memory"]["recomputed_segments"] > 0 and manifest.producer["memory"]["loss_chunks"] == 8
    batch, lr = _batch(manifest), 1e-3
    loss, before, after = _ort_step(bundle, manifest, batch, lr, None)
    start = {t.peft_key: before[t.graph_name] for t in manifest.trainable}
    ref_loss, ref_after = _torch_adamw_step(tiny_model_dir, start, batch, lr, manifest.optimizer)
    assert abs(loss - ref_loss) <= RTOL * abs(ref_loss)
    for t in manifest.trainable:
        assert _rel(after[t.graph_name], ref_after[t.peft_key]) <= RTOL, t.peft_key
        assert not np.allclose(after[t.graph_name], before[t.graph_name]), t.peft_key  # every weight moved


def test_manifest_declares_every_weight(full_bundle, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    m = read_manifest(full_bundle)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert {t.peft_key for t in m.trainable} == set(dict(model.named_parameters()))
    assert m.frozen == [] and m.quantization == "none" and m.method["peft_config"]["format"] == "edgetune-full-finetune"
    assert m.base_model["parameters"] == sum(p.numel() for p in model.parameters())
    r = _cli("inspect", full_bundle)
    assert "full fine-tuning" in r.stdout and "(100.00% of the base)" in r.stdout, r.stdout


def test_quantized_base_is_refused_with_the_reason(tiny_model_dir, tmp_path):
    r = _cli("export", tiny_model_dir, "--method", "full", "--out", tmp_path / "b")  # --quantize defaults to int8
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("error: --method full trains every weight in fp32, so the base cannot "
                                                 "be quantized; pass --quantize none (got --quantize int8).")
    assert not (tmp_path / "b").exists()
    r = _cli("export", tiny_model_dir, "--method", "full", "--quantize", "none", "--rank", "4", "--out", tmp_path / "b")
    assert r.returncode == 2 and "--rank do(es) not apply to --method full" in r.stderr


def test_train_delta_import_round_trip(full_bundle, tiny_model_dir, tmp_path):
    """export -> train -> eval (off = exported base) -> delta (W - W_base) -> to-peft folder torch loads -> from-peft."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from edgetune.delta import read_delta
    from edgetune.runtime.adapter_source import initial_adapter, latest_adapter
    from edgetune.runtime.generate import Generator

    bundle = tmp_path / "b"
    shutil.copytree(full_bundle, bundle)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(f'{{"instruction": "Name {i}?", "output": "name={i}"}}\n' for i in range(8)))
    r = _cli("train", bundle, "--data", data, "--steps", 3, "--batch-size", 4, "--lr", "1e-3", "--quiet", "--threads", 1)
    assert r.returncode == 0, r.stderr
    manifest = read_manifest(bundle)
    base = initial_adapter(Bundle.open(bundle))
    trained = latest_adapter(Bundle.open(bundle)).tensors
    assert all(not np.array_equal(trained[k], base[k]) for k in base)

    import json

    r = _cli("eval", bundle, "--data", data, "--json", "--threads", 1)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    fresh = tmp_path / "fresh"
    shutil.copytree(full_bundle, fresh)
    untrained = json.loads(_cli("eval", fresh, "--data", data, "--json", "--threads", 1).stdout)
    # adapter off is the exported base (not zero weights): the untrained bundle's loss
    assert result["without_adapter"]["loss"] == pytest.approx(untrained["with_adapter"]["loss"], rel=1e-6)
    assert result["with_adapter"]["loss"] < result["without_adapter"]["loss"]

    r = _cli("delta", bundle, "--out", tmp_path / "d.etd", "--codec", "fp32")
    assert r.returncode == 0 and "% of the fp32 base" in r.stdout and "differences from the exported base" in r.stdout, r.stdout
    delta = read_delta(tmp_path / "d.etd")
    for t in manifest.trainable:  # the delta holds W - W_base
        np.testing.assert_allclose(delta.tensors[t.peft_key], trained[t.graph_name] - base[t.graph_name], atol=1e-7)
    small = tmp_path / "d8.etd"
    assert _cli("delta", bundle, "--out", small, "--codec", "int8").returncode == 0
    assert small.stat().st_size < 0.3 * (tmp_path / "d.etd").stat().st_size

    r = _cli("to-peft", tmp_path / "d.etd", "--bundle", bundle, "--out", tmp_path / "weights")
    assert r.returncode == 0 and "no PEFT adapter" in r.stdout and "load_state_dict" in r.stdout, r.stdout
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager", dtype=torch.float32)
    result = model.load_state_dict(load_file(str(tmp_path / "weights" / "model.safetensors")), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]  # tied to the embedding
    ids = np.random.default_rng(0).integers(3, manifest.base_model["config"]["vocab_size"], size=(2, 9))
    mask = np.ones_like(ids)
    with torch.no_grad():
        ref = model.eval()(input_ids=torch.tensor(ids)).logits.numpy()
    ours = Generator(Bundle.open(bundle)).logits(ids, mask, trained)
    assert np.abs(ours - ref).max() <= 1e-3

    r = _cli("from-peft", tmp_path / "weights", "--bundle", fresh)  # the folder imports back as the trained weights
    assert r.returncode == 0, r.stderr
    imported = latest_adapter(Bundle.open(fresh)).tensors
    for k in trained:
        np.testing.assert_allclose(imported[k], trained[k], atol=1e-6)
