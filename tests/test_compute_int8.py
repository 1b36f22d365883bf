"""``export --compute int8`` (edgetune/export/compute_int8.py): int8 GEMMs on the int8 weights.

The int8-compute bundle is compared with the exact bundle (same options, ``--compute fp32``) on the
same batch and adapter values, with both training backends. The tolerances are measured, not
derived: on the tiny model (hidden 64, 2 layers, random weights) the export's per-row quantization
of activations and gradients moved the loss by 3e-5 to 5.4e-4 relative and the worst gradient
tensor by 6.4-9.3 % relative (Frobenius norm; batches of seeds 0-2; both backends gave the same
numbers); the bounds below leave >= 2x room. (On the real model the errors are larger: README,
Performance.)
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgetune.bundle import Bundle, read_manifest
from edgetune.errors import ExportError
from edgetune.export.exporter import ExportOptions
from tests.test_export import _batch
from tests.test_memory import _start

LOSS_RTOL = 2e-3  # |loss_int8 - loss| / |loss|
GRAD_RTOL = 0.2  # ||g_int8 - g|| / ||g|| per trainable tensor
WEIGHT_DQ = "DequantizeLinear"


def _loss_and_grads(bundle, backend_name, batch, start):
    from edgetune.runtime.backend import open_backend

    opened = Bundle.open(bundle)
    backend = open_backend(backend_name, opened, training=False, with_eval=True)
    backend.set_trainable(start)
    loss = backend.train_step(batch)
    if backend_name == "ort-training":
        grads = {t.graph_name: np.array(backend._state.parameters[t.graph_name].grad) for t in opened.manifest.trainable}
    else:
        grads = dict(backend._grads)
    return loss, grads, backend.eval_loss(batch)


def _rel(a, b) -> float:
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


@pytest.mark.parametrize("backend_name", ["ort-training", "portable"])
def test_int8_compute_is_close_to_the_exact_loss_and_gradients(export_tiny, backend_name):
    exact = export_tiny(quantize="int8")
    int8 = export_tiny(quantize="int8", compute="int8")
    assert read_manifest(int8).portable["supported"]
    for seed in range(2):
        batch, start = _batch(read_manifest(exact), seed=seed), _start(exact)
        ref_loss, ref_grads, ref_eval = _loss_and_grads(exact, backend_name, batch, start)
        loss, grads, eval_loss = _loss_and_grads(int8, backend_name, batch, start)
        assert loss != ref_loss  # the int8 products really ran (they change the numbers)
        assert abs(loss - ref_loss) <= LOSS_RTOL * abs(ref_loss)
        assert abs(eval_loss - ref_eval) <= LOSS_RTOL * abs(ref_eval)
        for name, ref in ref_grads.items():
            assert np.abs(ref).max() > 0, name
            assert _rel(grads[name], ref) <= GRAD_RTOL, (name, _rel(grads[name], ref))


def _weight_uses(model: onnx.ModelProto):
    """(op_type of every node reading a stored int8 tensor, DequantizeLinear nodes of stored int8 tensors)."""
    graph = model.graph
    int8 = {i.name for i in graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.INT8}
    int8 |= {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    readers = [n.op_type for n in graph.node if any(i in int8 for i in n.input)]
    return readers, [n for n in graph.node if n.op_type == WEIGHT_DQ and n.input[0] in int8]


def test_int8_compute_graph_never_dequantizes_a_frozen_weight(export_tiny):
    exact = export_tiny(quantize="int8")
    int8 = export_tiny(quantize="int8", compute="int8")
    compute = read_manifest(int8).producer["compute"]
    # 2 layers x 7 projections + the LM head in 8 loss chunks (tied to the int8 embedding); layer 0's
    # q/k/v need no input gradient (the embedding is frozen)
    assert compute["forward"] == 14 + 8 and compute["input_gradient"] == 14 - 3 + 8
    assert compute["left"] == []
    for name in ("training_model.onnx", "eval_model.onnx"):
        readers, dqs = _weight_uses(onnx.load(str(int8 / name)))
        assert dqs == [], name
        # Slice: the gated copy before W^T; Gather: the embedding rows; the input gradients read q itself
        backward = {"MatMulIntegerToFloat"} if name == "training_model.onnx" else set()
        assert set(readers) == {"Slice", "Gather", *backward}, (name, set(readers))
        # one int8 W^T per projection; the training graph's loss chunks share one (memory_loss.py), the eval graph's not
        assert readers.count("Slice") == 14 + (1 if name == "training_model.onnx" else 8), name
        _, exact_dqs = _weight_uses(onnx.load(str(exact / name)))
        assert exact_dqs  # the exact graph does dequantize (the check above can fail)
    portable = onnx.load(str(int8 / read_manifest(int8).portable["file"]))  # frozen weights are its initializers
    readers, dqs = _weight_uses(portable)
    assert dqs == [] and "MatMulIntegerToFloat" in readers


def test_exact_default_is_unchanged(export_tiny):
    manifest = read_manifest(export_tiny(quantize="int8"))
    assert manifest.producer["compute"] == {"matmul": "fp32"}
    ops = {n.op_type for n in onnx.load(str(export_tiny(quantize="int8") / "training_model.onnx")).graph.node}
    assert "DynamicQuantizeMatMul" not in ops and "MatMulIntegerToFloat" not in ops


def test_inspect_shows_the_compute(export_tiny):
    from edgetune.summary import bundle_summary

    int8 = Bundle.open(export_tiny(quantize="int8", compute="int8"), verify=False)
    exact = Bundle.open(export_tiny(quantize="int8"), verify=False)
    assert "compute     int8 GEMMs on the int8 weights" in bundle_summary(int8)
    assert "compute     fp32 (exact)" in bundle_summary(exact)


@pytest.mark.parametrize("options, words", [
    ({"quantize": "int4"}, "needs --quantize int8"),
    ({"quantize": "none"}, "needs --quantize int8"),
    ({"memory_rewrites": False}, "--no-memory-rewrites"),
    ({"task": "dpo"}, "--task causal-lm only"),
    ({"compute": "int4"}, "unsupported --compute"),
    ({"head_slices": 4}, "--head-slices applies to fp32 compute only"),
])
def test_int8_compute_refusals_name_the_fix(tmp_path, options, words):
    options = {"compute": "int8", **options}
    with pytest.raises(ExportError, match=words):
        ExportOptions(source=None, out=tmp_path / "b", **options)


def test_cli_refuses_int8_compute_on_an_int4_base_in_one_line(tiny_model_dir, tmp_path):
    from tests.test_export import _cli

    r = _cli("export", str(tiny_model_dir), "--quantize", "int4", "--compute", "int8", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --compute int8 multiplies int8 weights")
    assert not (tmp_path / "o").exists()
