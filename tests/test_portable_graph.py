"""The portable gradient graph in an exported bundle (edgetune/export/portable/).

Its loss and every gradient must equal what ONNX Runtime's training backend computes for the same
batch and adapter values (read from the training session's gradient buffers after one
``train_step``), for fp32 and int8 bases and for several memory plans; it must contain only
operators the stock onnxruntime CPU build has; and a node without a rewrite leaves a bundle that
still trains with ``ort-training`` and says it is not portable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgetune.bundle import Bundle, Manifest, read_manifest
from edgetune.export.portable.stock_ops import is_stock
from tests.test_export import _batch
from tests.test_memory import _loss_and_grads, _start

BUNDLES = {  # name -> export options (shared with other tests' exports where they coincide)
    "fp32-cheap-8": {"quantize": "none"},
    "int8-cheap-8": {"quantize": "int8"},
    "int8-full-8": {"quantize": "int8", "recompute": "full", "loss_chunks": 8},
    "fp32-mlp-1": {"quantize": "none", "recompute": "mlp", "loss_chunks": 1},
    "int8-plain": {"quantize": "int8", "memory_rewrites": False},
    "int8-every-projection": {"quantize": "int8", "rank": 4, "use_rslora": True,
                              "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")},
}
FEW_LABELS = {"input_ids": np.array([[5, 6, 7, 8]], np.int64), "attention_mask": np.ones((1, 4), np.int64),
              "labels": np.array([[-100, -100, 7, 8]], np.int64)}  # 2 label positions, 8 loss chunks


def assert_portable_matches_training(bundle: Path, batch: dict) -> None:
    """The bundle's portable graph gives the training graph's loss and gradients (1e-5) from its initial
    adapter, and records no unsupported operator."""
    from tests.test_memory import _loss_and_grads, _start

    manifest = read_manifest(bundle)
    assert manifest.portable["supported"] and manifest.portable["unsupported"] == []
    adapter = _start(bundle)
    ref_loss, ref_grads = _loss_and_grads(bundle, batch, adapter)
    loss, grads, _ = _portable(bundle, manifest, batch, adapter)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for t, ref in ref_grads.items():
        assert np.abs(ref).max() > 0, t
        np.testing.assert_allclose(grads[t], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=t)


def _portable(bundle: Path, manifest: Manifest, batch: dict, adapter: dict) -> tuple[float, dict, float]:
    """(loss, {graph_name: gradient}, eval loss) from the portable graphs run as plain inference."""
    import onnxruntime as ort

    portable = manifest.portable
    from edgetune.runtime.batches import graph_inputs

    names = [i.name for i in manifest.inputs]
    feeds = {**dict(zip(names, graph_inputs(batch, names))), **adapter}  # position_ids 0..T-1 when absent
    session = ort.InferenceSession(str(bundle / portable["file"]), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, feeds)))
    grads = {t: out[o] for t, o in portable["gradients"].items()}
    evaluation = ort.InferenceSession(str(bundle / portable["eval_file"]), providers=["CPUExecutionProvider"])
    return float(out[portable["loss"]]), grads, float(evaluation.run(None, feeds)[0])


def _ort_eval_loss(bundle, manifest, batch, adapter) -> float:
    from edgetune.runtime.backend import open_backend

    backend = open_backend("ort-training", Bundle.open(bundle), with_eval=True, training=False)
    backend.set_trainable(adapter)
    return backend.eval_loss(batch)


@pytest.mark.parametrize("name", list(BUNDLES))
@pytest.mark.parametrize("few_labels", [False, True], ids=["batch", "two-labels"])
def test_portable_graph_gives_the_training_backends_loss_and_gradients(export_tiny, name, few_labels):
    bundle = export_tiny(**BUNDLES[name])
    manifest = read_manifest(bundle)
    assert manifest.portable["supported"] and manifest.portable["unsupported"] == []
    batch, adapter = (FEW_LABELS if few_labels else _batch(manifest)), _start(bundle)
    ref_loss, ref_grads = _loss_and_grads(bundle, batch, adapter)
    loss, grads, eval_loss = _portable(bundle, manifest, batch, adapter)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert abs(eval_loss - _ort_eval_loss(bundle, manifest, batch, adapter)) <= 1e-5 * abs(ref_loss)
    assert set(grads) == set(ref_grads) == {t.graph_name for t in manifest.trainable}
    for t, ref in ref_grads.items():
        assert np.abs(ref).max() > 0, t  # the comparison means something
        np.testing.assert_allclose(grads[t], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=t)


@pytest.mark.parametrize("name", ["fp32-cheap-8", "int8-full-8"])
def test_portable_graphs_hold_only_stock_operators_and_the_contract(export_tiny, name):
    bundle = export_tiny(**BUNDLES[name])
    manifest = read_manifest(bundle)
    p = manifest.portable
    trainable = [t.graph_name for t in manifest.trainable]
    for file, outputs in ((p["file"], ["loss"] + [f"{t}_grad" for t in trainable]), (p["eval_file"], ["loss"])):
        model = onnx.load(str(bundle / file), load_external_data=False)
        assert [(n.domain, n.op_type) for n in model.graph.node if not is_stock(n.domain, n.op_type)] == []
        assert {o.domain for o in model.opset_import} <= {"", "com.microsoft"}
        assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "labels", "position_ids", *trainable]
        types = [i.type.tensor_type.elem_type for i in model.graph.input]
        assert types == [onnx.TensorProto.INT64] * 4 + [onnx.TensorProto.FLOAT] * len(trainable)
        assert [o.name for o in model.graph.output] == outputs
        external = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        assert external == {"portable_weights.bin"}  # one shared file, a plain name inside the bundle
    assert p["gradients"] == {t: f"{t}_grad" for t in trainable}
    assert {p["file"], p["eval_file"], "portable_weights.bin"} <= set(manifest.files)
    if manifest.quantization == "int8":  # frozen weights stay int8, read through DequantizeLinear
        model = onnx.load(str(bundle / p["file"]), load_external_data=False)
        int8 = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
        assert len(int8) == 2 * 7 + 1  # 2 layers x 7 projections + the embedding
        assert not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2 and t.dims[0] * t.dims[1] >= 64 * 64
                       for t in model.graph.initializer)


# A Python whose onnxruntime is the stock package: EDGETUNE_STOCK_PYTHON / EDGETUNE_PY312, else the
# Python 3.12 base-install environment `make venv312` builds.
STOCK_PYTHON = next((p for p in (os.environ.get("EDGETUNE_STOCK_PYTHON"), os.environ.get("EDGETUNE_PY312"),
                                 str(Path(__file__).resolve().parents[1] / ".venv312" / "bin" / "python"))
                     if p and Path(p).is_file()), None)


@pytest.mark.skipif(not STOCK_PYTHON, reason="no Python with the stock onnxruntime: run `make venv312` or set EDGETUNE_STOCK_PYTHON")
def test_stock_onnxruntime_runs_the_portable_graph(tiny_bundle_int8, tmp_path):
    """In another interpreter with the stock package (no training build): same loss and gradients."""
    manifest = read_manifest(tiny_bundle_int8)
    batch, adapter = _batch(manifest), _start(tiny_bundle_int8)
    ref_loss, ref_grads = _loss_and_grads(tiny_bundle_int8, batch, adapter)
    from edgetune.runtime.batches import default_positions

    np.savez(tmp_path / "feeds.npz", **batch, position_ids=default_positions(batch["input_ids"]), **adapter)
    script = tmp_path / "run.py"
    script.write_text(STOCK_SCRIPT)
    done = subprocess.run([STOCK_PYTHON, str(script), str(tiny_bundle_int8), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    stock = np.load(tmp_path / "out.npz")
    assert "onnxruntime.training" not in done.stdout  # the stock build: no training API
    assert abs(float(stock["loss"]) - ref_loss) <= 1e-5 * abs(ref_loss)
    for t, ref in ref_grads.items():
        np.testing.assert_allclose(stock[f"{t}_grad"], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=t)
    kernels = set(json.loads(done.stdout.splitlines()[-1]))
    model = onnx.load(str(tiny_bundle_int8 / manifest.portable["file"]), load_external_data=False)
    assert {f"{n.domain}:{n.op_type}" for n in model.graph.node} - kernels <= {":Constant"}


STOCK_SCRIPT = """
import importlib.util, json, sys
import numpy as np, onnxruntime as ort
from onnxruntime.capi import _pybind_state as C
bundle, work = sys.argv[1], sys.argv[2]
if importlib.util.find_spec("onnxruntime.training"):
    print("onnxruntime.training")
feeds = dict(np.load(work + "/feeds.npz"))
session = ort.InferenceSession(bundle + "/portable_model.onnx", providers=["CPUExecutionProvider"])
np.savez(work + "/out.npz", **dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds))))
print(json.dumps(sorted({(k.domain if k.domain != "ai.onnx" else "") + ":" + k.op_name
                         for k in C.get_all_opkernel_def() if k.provider == "CPUExecutionProvider"})))
"""


def test_node_without_a_rule_leaves_a_bundle_without_portable_graph(tiny_model_dir, tmp_path, monkeypatch):
    from edgetune.export.portable import rules
    from edgetune.runtime.backend import open_backend
    from edgetune.summary import backends_text
    from tests.conftest import _export

    monkeypatch.delitem(rules.RULES, ("com.microsoft", "SliceGrad"))
    bundle = _export(tiny_model_dir, tmp_path / "b", quantize="none")
    manifest = read_manifest(bundle)
    p = manifest.portable
    assert p["supported"] is False and p["file"] is None and p["gradients"] == {}
    assert {u["op_type"] for u in p["unsupported"]} == {"SliceGrad"} and all(u["node"] for u in p["unsupported"])
    assert not list(bundle.glob("portable*"))
    backend = open_backend("ort-training", Bundle.open(bundle))  # the ORT artifacts still train
    assert np.isfinite(backend.train_step(_batch(manifest)))
    assert "not portable" in backends_text(p) and "SliceGrad" in backends_text(p)


def test_unknown_operator_is_reported_with_its_node(tiny_bundle, tmp_path):
    from edgetune.export.portable import export_portable

    folder = tmp_path / "b"
    shutil.copytree(tiny_bundle, folder, ignore=shutil.ignore_patterns("portable*"))
    model = onnx.load(str(folder / "training_model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "Softmax")
    mystery = onnx.helper.make_node("Mystery", [node.output[0]], ["mystery_out"], name="the_mystery", domain="com.example")
    node.output[0], mystery.input[0], mystery.output[0] = "mystery_in", "mystery_in", node.output[0]
    model.graph.node.insert(list(model.graph.node).index(node) + 1, mystery)
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    onnx.save(model, str(folder / "training_model.onnx"))
    lines = []
    record = export_portable(folder, [t.graph_name for t in read_manifest(tiny_bundle).trainable], lines.append)
    assert record["supported"] is False
    expected = {"op_type": "Mystery", "node": "the_mystery", "graph": "portable_model.onnx"}
    assert expected.items() <= record["unsupported"][0].items()
    assert any("Mystery" in line and "the_mystery" in line for line in lines)
    assert not list(folder.glob("portable*"))


def test_manifest_without_portable_record_still_loads(tiny_bundle, tmp_path):
    from edgetune.summary import bundle_summary

    data = json.loads((tiny_bundle / "edgetune.json").read_text())
    data.pop("portable")
    manifest = Manifest.from_dict(data)
    assert manifest.portable is None
    assert "backends    ort-training (no portable graph" in bundle_summary(Bundle(tiny_bundle, manifest, verified=False))
    assert "backends    ort-training, portable" in bundle_summary(Bundle.open(tiny_bundle))


@pytest.mark.slow
def test_default_model_portable_graph_matches_the_training_backend(tmp_path_factory):
    """SmolLM2-135M, int8, default memory plan: loss and gradients of the portable graph equal ORT
    training's for a batch of 2 x 64 tokens."""
    from edgetune.export.exporter import ExportOptions, export_bundle

    bundle = tmp_path_factory.mktemp("default-portable") / "bundle"
    export_bundle(ExportOptions(source=None, out=bundle))
    manifest = read_manifest(bundle)
    assert manifest.portable["supported"], manifest.portable["unsupported"]
    rng = np.random.default_rng(0)
    ids = rng.integers(10, manifest.base_model["config"]["vocab_size"], size=(2, 64), dtype=np.int64)
    labels = ids.copy()
    labels[:, :20] = -100
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}
    adapter = _start(bundle)
    ref_loss, ref_grads = _loss_and_grads(bundle, batch, adapter)
    loss, grads, _ = _portable(bundle, manifest, batch, adapter)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for t, ref in ref_grads.items():
        np.testing.assert_allclose(grads[t], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=t)
