"""Exporter: the ONNX training step equals a PyTorch + PEFT step; int8 stays close; bad input is refused."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgetune.bundle import Bundle, read_manifest
from tests.reference import peft_adamw_step, peft_model

RTOL = 1e-4


def _batch(manifest, seed=0, batch=3, seq=12):
    rng = np.random.default_rng(seed)
    vocab = manifest.base_model["config"]["vocab_size"]
    ids = rng.integers(3, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    labels = ids.copy()
    labels[:, :5] = -100  # prompt tokens masked
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _ort_step(bundle, manifest, batch, lr, start: dict | None):
    from edgetune.runtime.backend import open_backend

    backend = open_backend("ort-training", Bundle.open(bundle))
    if start is not None:
        backend.set_trainable(start)
    before = backend.trainable()
    loss = backend.train_step(batch)
    backend.optimizer_step(lr)
    return loss, before, backend.trainable()


def _config(manifest):
    from edgetune.methods import get_method

    return get_method("lora").config(manifest)


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


ALL_LINEAR_PATTERNS = {"targets": ("all-linear",), "rank_pattern": {"down_proj": 16, r"layers\.1\.self_attn\.[qk]_proj": 2},
                       "alpha_pattern": {"o_proj": 4.0, "gate_proj": 64}}


@pytest.mark.parametrize("random_b, lora", [(False, {}), (True, {}), (True, {"use_rslora": True, "rank": 4, "targets": ("q_proj", "o_proj", "down_proj")}),
                                            (True, ALL_LINEAR_PATTERNS)],
                         ids=["exported-init", "nonzero-B", "rslora-r4-other-targets", "all-linear-rank-alpha-patterns"])
def test_one_adamw_step_matches_peft(export_tiny, tiny_model_dir, random_b, lora):
    tiny_bundle = export_tiny(quantize="none", **lora)
    manifest = read_manifest(tiny_bundle)
    batch, lr = _batch(manifest), 1e-3
    start = None
    if random_b:  # with B != 0, A gets a gradient too
        rng = np.random.default_rng(1)
        from edgetune.runtime.adapter_source import initial_adapter

        start = {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in initial_adapter(Bundle.open(tiny_bundle)).items()}
    loss, before, after = _ort_step(tiny_bundle, manifest, batch, lr, start)
    by_peft = {t.peft_key: before[t.graph_name] for t in manifest.trainable}
    reference = peft_model(tiny_model_dir, manifest, by_peft)
    if lora is ALL_LINEAR_PATTERNS:  # PEFT chose the same layers, ranks and scalings
        layers = {name: m for name, m in reference.base_model.model.named_modules() if hasattr(m, "lora_A")}
        assert len(layers) == 2 * 7 and "lm_head" not in layers  # q, k, v, o, gate, up, down per layer; never the head
        cfg = _config(manifest)
        assert {n: (m.r["default"], m.scaling["default"]) for n, m in layers.items()} == {
            n: (cfg.rank_of(n), cfg.scaling_of(n)) for n in layers}
        assert {m.r["default"] for m in layers.values()} == {2, 8, 16}
    ref_loss, ref_after = peft_adamw_step(reference, batch, lr, manifest.optimizer)
    assert abs(loss - ref_loss) <= RTOL * abs(ref_loss)
    assert set(ref_after) == {t.peft_key for t in manifest.trainable}
    for t in manifest.trainable:
        assert _rel(after[t.graph_name], ref_after[t.peft_key]) <= RTOL, t.peft_key
        if random_b or "lora_B" in t.peft_key:  # the step really moved the tensor
            assert not np.allclose(after[t.graph_name], before[t.graph_name])


def test_manifest_records_peft_keys_and_hashes(tiny_bundle, tiny_model_dir):
    from edgetune.export.sources import resolve_source

    m = read_manifest(tiny_bundle)
    assert m.base_sha256 == resolve_source(str(tiny_model_dir)).sha256()
    keys = [t.peft_key for t in m.trainable]
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    assert {"training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint", "tokenizer.json",
            "generation_model.onnx"} <= set(m.files)
    assert all(t.quantization == "none" for t in m.frozen)


def test_int8_bundle_stays_close_to_fp32(tiny_bundle, tiny_bundle_int8):
    """Eval loss and logits of the int8 base within stated tolerances of the fp32 base."""
    from edgetune.runtime.adapter_source import initial_adapter
    from edgetune.runtime.backend import open_backend
    from edgetune.runtime.generate import Generator

    m32, m8 = read_manifest(tiny_bundle), read_manifest(tiny_bundle_int8)
    assert m8.quantization == "int8"
    quantized = {t.graph_name for t in m8.frozen if t.quantization != "none"}
    assert "model.model.embed_tokens.weight" in quantized and any("q_proj.base.weight" in n for n in quantized)
    batch = _batch(m32)
    losses = [open_backend("ort-training", Bundle.open(b), with_eval=True, training=False).eval_loss(batch)
              for b, m in ((tiny_bundle, m32), (tiny_bundle_int8, m8))]
    assert abs(losses[0] - losses[1]) <= 0.01 * losses[0]  # stated: eval loss within 1 %
    logits = [Generator(Bundle.open(b)).logits(batch["input_ids"], batch["attention_mask"], initial_adapter(Bundle.open(b)))
              for b, m in ((tiny_bundle, m32), (tiny_bundle_int8, m8))]
    # stated tolerance: relative L2 error of the logits <= 2 %, largest error <= 5 % of the largest logit
    assert np.linalg.norm(logits[0] - logits[1]) <= 0.02 * np.linalg.norm(logits[0])
    assert np.abs(logits[0] - logits[1]).max() <= 0.05 * np.abs(logits[0]).max()
    assert (logits[0].argmax(-1) == logits[1].argmax(-1)).mean() >= 0.9
    assert open(tiny_bundle_int8 / "checkpoint", "rb").seek(0, 2) < 0.5 * open(tiny_bundle / "checkpoint", "rb").seek(0, 2)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgetune.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, expected", [
    (["export", "/no/such/model", "--out", "{tmp}/o"], "not found"),
    (["export", "{model}", "--rank", "0", "--out", "{tmp}/o"], "`rank` must be a positive integer"),
    (["export", "{model}", "--quantize", "int3", "--out", "{tmp}/o"], "unsupported quantization 'int3'"),
    (["export", "{model}", "--targets", "q_proj,qkv", "--out", "{tmp}/o"], "qkv not found in this model; linear layers it has:"),
    (["export", "{model}", "--rank-pattern", "down_proj", "--out", "{tmp}/o"], "--rank-pattern takes name=number pairs"),
    (["export", "{model}", "--alpha-pattern", "o_proj=-2", "--out", "{tmp}/o"], "`alpha_pattern` value for 'o_proj' must be positive"),
    (["export", "{model}", "--quantize", "int4", "--block-size", "48", "--out", "{tmp}/o"], "--block-size must be one of 32, 64, 128, got 48"),
    (["export", "{model}", "--method", "full", "--quantize", "int4", "--out", "{tmp}/o"], "pass --quantize none (got --quantize int4)"),
    (["export", "{model}", "--targets", "all-linear,q_proj", "--out", "{tmp}/o"], "all-linear already names every linear layer"),
    (["export", "{model}", "--targets", "all-linear", "--rank-pattern", "down_prj=4", "--out", "{tmp}/o"],
     "--rank-pattern 'down_prj' match(es) none of the adapted layers"),
    (["export", "{model}", "--out", "{tmp}"], "already exists; pass --force"),
    (["export", "{model}/config.json", "--out", "{tmp}/o"], "is not a .gguf file"),
    (["inspect", "{tmp}"], "has no edgetune.json"),
])
def test_bad_input_is_one_line_exit_2(args, expected, tiny_model_dir, tmp_path):
    args = [a.format(tmp=tmp_path, model=tiny_model_dir) for a in args]
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in r.stderr and len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0]
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_unknown_model_type_lists_supported(tmp_path, tiny_model_dir):
    import json
    import shutil

    bad = tmp_path / "m"
    shutil.copytree(tiny_model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "not-a-model"
    (bad / "config.json").write_text(json.dumps(cfg))
    r = _cli("export", str(bad), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and ("not-a-model" in r.stderr) and "Traceback" not in r.stderr


def test_inspect_shows_summary_and_json(tiny_bundle):
    r = _cli("inspect", str(tiny_bundle))
    assert r.returncode == 0, r.stderr
    assert "lora r=8 alpha=16 on q_proj,v_proj" in r.stdout and "training_model.onnx" in r.stdout
    assert "memory plan --recompute cheap (4 blocks recomputed), loss in 8 chunks" in r.stdout
    r = _cli("inspect", str(tiny_bundle), "--json")
    import json

    assert json.loads(r.stdout)["method"]["name"] == "lora"


def test_damaged_bundle_is_refused(tiny_bundle, tmp_path):
    import shutil

    from edgetune.errors import BundleError

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "eval_model.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(BundleError, match="eval_model.onnx do\\(es\\) not match"):
        read_manifest(copy)
    (copy / "checkpoint").unlink()
    with pytest.raises(BundleError, match="incomplete: missing checkpoint"):
        read_manifest(copy)
