"""Memory rewrites (edgetune/export/memory*.py): same loss and gradients as the plain graph.

Each optimised bundle is compared with one exported with ``memory_rewrites=False`` (the graph
exactly as ONNX Runtime's gradient builder writes it) on the same batch and adapter values; and
the rewritten training graph is checked for what the rewrites promise: the backward pass reads
no forward activation except the residual-stream tensors, and no frozen weight is transposed.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgetune.bundle import Bundle, read_manifest
from edgetune.export.memory_graph import GraphIndex
from edgetune.export.memory_recompute import residual_stream
from tests.test_export import _batch

PLAIN = {"memory_rewrites": False}
REWRITES = {
    "full-8": {"recompute": "full", "loss_chunks": 8},
    "cheap-3": {"recompute": "cheap", "loss_chunks": 3},
    "mlp-1": {"recompute": "mlp", "loss_chunks": 1},
}


def _loss_and_grads(bundle, batch, start):
    """One forward/backward; (loss, {trainable name: gradient}) read from ORT's checkpoint state."""
    from edgetune.runtime.backend import open_backend

    opened = Bundle.open(bundle)
    manifest = opened.manifest
    backend = open_backend("ort-training", opened, training=False)
    backend.set_trainable(start)
    loss = backend.train_step(batch)
    grads = {t.graph_name: np.array(backend._state.parameters[t.graph_name].grad) for t in manifest.trainable}
    return loss, grads


def _start(bundle):
    """Adapter values with B != 0, so that A gets a gradient too (a fixed seed: same for every bundle)."""
    from edgetune.runtime.adapter_source import initial_adapter

    rng = np.random.default_rng(7)
    adapter = initial_adapter(Bundle.open(bundle))
    return {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in sorted(adapter.items())}


@pytest.mark.parametrize("quantize", ["none", "int8"])
@pytest.mark.parametrize("rewrite", list(REWRITES))
def test_rewritten_graph_gives_the_plain_graphs_loss_and_gradients(export_tiny, quantize, rewrite):
    plain = export_tiny(quantize=quantize, **PLAIN)
    optimised = export_tiny(quantize=quantize, **REWRITES[rewrite])
    assert read_manifest(plain).producer["memory"] is None
    report = read_manifest(optimised).producer["memory"]
    assert report["transposes_removed"] > 0 and report["recomputed_segments"] == 4  # 2 layers x (attention, MLP)
    batch, start = _batch(read_manifest(plain)), _start(plain)
    ref_loss, ref_grads = _loss_and_grads(plain, batch, start)
    loss, grads = _loss_and_grads(optimised, batch, start)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    for name, ref in ref_grads.items():
        assert np.abs(ref).max() > 0, name  # the comparison means something
        np.testing.assert_allclose(grads[name], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max(), err_msg=name)


def test_chunked_loss_survives_fewer_label_positions_than_chunks(export_tiny):
    """A batch with 2 label positions and 8 loss chunks: every chunk still gets a row (an empty
    chunk would crash ORT's SoftmaxCrossEntropyLoss), and the loss equals the plain graph's."""
    optimised = export_tiny(quantize="none", recompute="full", loss_chunks=8)
    plain = export_tiny(quantize="none", **PLAIN)
    batch = {"input_ids": np.array([[5, 6, 7, 8]], np.int64), "attention_mask": np.ones((1, 4), np.int64),
             "labels": np.array([[-100, -100, 7, 8]], np.int64)}
    start = _start(plain)
    ref_loss, ref_grads = _loss_and_grads(plain, batch, start)
    loss, grads = _loss_and_grads(optimised, batch, start)
    assert np.isfinite(loss) and abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    for name, ref in ref_grads.items():
        np.testing.assert_allclose(grads[name], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max(), err_msg=name)


def test_backward_reads_only_the_residual_stream_from_the_forward(export_tiny):
    bundle = export_tiny(quantize="int8", recompute="full", loss_chunks=8)
    graph = onnx.load(str(bundle / "training_model.onnx")).graph
    g = GraphIndex(graph, "loss")
    stream = set(residual_stream(g))
    assert len(stream) == 5  # embeddings + 2 layers x 2 blocks
    big_ops = {"MatMul", "FusedMatMul", "Gemm", "Softmax", "Mul", "Add", "SimplifiedLayerNormalization"}
    kept = set()
    for i in g.forward:
        node = g.nodes[i]
        if node.op_type not in big_ops:
            continue  # shapes, masks and other small tensors may be read across the turn
        out = node.output[0]  # the activation itself; side outputs (a norm's 1/std) are (B, T, 1)
        if any(c not in g.forward for c, _ in g.consumers[out]):
            kept.add(out)
    loss_head = {t for t in kept if t.startswith("memory.loss_chunk") or t.startswith("/model/norm/")}
    assert kept - stream - loss_head == set()


def test_no_frozen_weight_is_transposed(export_tiny):
    """Each int8 weight is read as DQ(W) (out, in) by FusedMatMul transB=1 or by the backward MatMul:
    a Transpose after a DequantizeLinear would make ORT insert a QuantizeLinear after it."""
    bundle = export_tiny(quantize="int8", recompute="full", loss_chunks=8)
    graph = onnx.load(str(bundle / "training_model.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in producer:
            assert producer[node.input[0]].op_type != "DequantizeLinear", node.name


def test_head_in_vocabulary_slices_gives_the_plain_graphs_loss_and_gradients(export_tiny):
    """--head-slices 5: every product with the int8 head reads a DQ of one slice of its rows, and
    loss and gradients are the plain graph's (memory_head.py)."""
    plain = export_tiny(quantize="int8", **PLAIN)
    sliced = export_tiny(quantize="int8", recompute="cheap", loss_chunks=3, head_slices=5)
    assert read_manifest(sliced).producer["memory"]["head_slices"] == 5
    graph = onnx.load(str(sliced / "training_model.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    table = "model.model.embed_tokens.weight.int8"
    dqs = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert not [n.name for n in dqs if n.input[0] == table]  # never the whole (V, H) table
    head_dqs = [n for n in dqs if n.input[0] in producer and producer[n.input[0]].op_type == "Slice"
                and producer[n.input[0]].input[0] == table]
    assert len(head_dqs) == 3 * 2 * 5  # chunks x (forward, backward) x slices
    batch, start = _batch(read_manifest(plain)), _start(plain)
    ref_loss, ref_grads = _loss_and_grads(plain, batch, start)
    loss, grads = _loss_and_grads(sliced, batch, start)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    for name, ref in ref_grads.items():
        assert np.abs(ref).max() > 0, name
        np.testing.assert_allclose(grads[name], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max(), err_msg=name)


def test_head_slices_auto_only_for_heads_too_large_to_copy_whole():
    from edgetune.export.memory_head import auto_slices

    assert auto_slices(49_152, 576) == 0  # SmolLM2-135M: 113 MB fp32, one shared copy
    assert auto_slices(49_152, 960) == 0  # SmolLM2-360M: 189 MB
    assert auto_slices(128_256, 2_048) == 16  # Llama-3.2-1B: 1.05 GB -> 16 slices of <= 64 MB


def test_head_slices_option_refuses_bad_values_in_one_line(tiny_model_dir, tmp_path):
    from tests.test_export import _cli

    r = _cli("export", str(tiny_model_dir), "--head-slices", "many", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--head-slices" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("options, words", [
    ({"quantize": "none"}, "--quantize none keeps the head in fp32"),
    ({"loss_chunks": 1}, "--loss-chunks 1"),
    ({"memory_rewrites": False}, "--no-memory-rewrites"),
    ({"task": "dpo"}, "--task dpo computes its head in one piece"),
])
def test_head_slices_refused_where_there_is_no_chunked_int8_head(tmp_path, options, words):
    from edgetune.errors import ExportError
    from edgetune.export.exporter import ExportOptions

    with pytest.raises(ExportError, match=words):
        ExportOptions(source=None, out=tmp_path / "b", head_slices=4, **options)
