"""Weight-only block-wise int4 quantization of the frozen linear weights, as a training-graph rewrite.

Exported, a linear weight W (out, in) is read as ``Transpose(W) -> MatMul``. Here W^T (in, out) is
stored as INT4 values plus one fp32 scale per block of ``block_size`` input rows and output column
(``edgetune.quantization.quantize_blocks``: symmetric, zero point 0), and the MatMul reads
``DequantizeLinear(q, scale, zp, axis=0, block_size)`` directly. What ONNX Runtime 1.19.2's
training build needs for this to load and train (each checked):
  * opset 21 (block-wise DequantizeLinear and INT4 arrived there). The TorchScript exporter stops
    at opset 20, so the graph is exported at 20 and re-stamped 21: opset 21 only extends types.
    (From 17 it could not be: ReduceMean changed at 18.)
  * no Transpose after the DequantizeLinear: with one, session start fails with "x_scale must be
    ceil(Di/block_size) on the quantize axis"; so the weight is stored pre-transposed.
  * the INT4 tensors stay graph constants, left out of the checkpoint's frozen parameters: an ORT
    checkpoint cannot hold INT4 ("Unsupported data type: 22"). The fp32 scales may go there.
Weights read otherwise (the embedding table, and a head tied to it) are left for the int8 rewrite.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgetune.onnx_graph import sort_graph
from edgetune.quantization import quantize_blocks

INT4_OPSET = 21  # block-wise DequantizeLinear with INT4
EXPORT_OPSET = 20  # the TorchScript exporter's last opset; re-stamped INT4_OPSET by ``restamp``


def restamp(model: onnx.ModelProto) -> None:
    """Opset 20 -> 21 for the default domain (21 only adds types to operators 20 already has)."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            if opset.version != EXPORT_OPSET:
                raise ValueError(f"int4 needs a graph exported at opset {EXPORT_OPSET}, got {opset.version}")
            opset.version = INT4_OPSET


def linear_weights(model: onnx.ModelProto, names: list[str]) -> list[str]:
    """Of the 2-D fp32 initializers ``names``, those read only through ``Transpose(perm=[1, 0])``."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return [n for n in names if readers.get(n) and all(
        r.op_type == "Transpose" and list(_perm(r)) == [1, 0] for r in readers[n])]


def _perm(node: onnx.NodeProto):
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])


def int4_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    """An INT4 initializer from int values in [-8, 7], packed two per byte (first element in the low
    nibble, as ONNX stores INT4) with numpy; ``helper.make_tensor`` packs a Python list, which for
    the 100 M weights of a small model takes minutes."""
    nibbles = values.reshape(-1).astype(np.uint8) & 0x0F
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    packed = nibbles[0::2] | (nibbles[1::2] << 4)
    return helper.make_tensor(name, TensorProto.INT4, list(values.shape), packed.tobytes(), raw=True)


def quantize_graph_int4(model: onnx.ModelProto, names: list[str], block_size: int) -> list[str]:
    """Replace each named weight (read only through a Transpose) by INT4 W^T + scales + DequantizeLinear.

    Returns the INT4 initializer names (to keep out of the checkpoint).
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    wanted = set(names)
    transposes = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Transpose" and n.input[0] in wanted}
    int4: list[str] = []
    new_nodes = []
    for name in names:
        wt = numpy_helper.to_array(inits[name]).T  # (in, out)
        q, scale = quantize_blocks(wt, block_size)
        q_name, scale_name, zero_name, out = (f"{name}.int4", f"{name}.scale", f"{name}.zero_point", f"{name}.T")
        graph.initializer.remove(inits[name])
        graph.initializer.extend([
            int4_tensor(q_name, q),
            numpy_helper.from_array(scale, scale_name),
            int4_tensor(zero_name, np.zeros(scale.shape, np.int8)),
        ])
        new_nodes.append(helper.make_node("DequantizeLinear", [q_name, scale_name, zero_name], [out], axis=0,
                                          block_size=block_size, name=f"{name}/DequantizeLinear"))
        int4 += [q_name, zero_name]
    rename = {t_out: f"{w}.T" for t_out, w in transposes.items()}  # readers of Transpose(W) read the DQ output
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    kept = [n for n in graph.node if not (n.op_type == "Transpose" and n.output[0] in rename)]
    del graph.node[:]
    graph.node.extend(kept)
    sort_graph(graph, new_nodes)
    return int4


INT4_WEIGHTS = "int4_weights.bin"  # the bundle file holding the INT4 constants of every graph that reads them


def share_int4_weights(folder) -> None:
    """Store the INT4 constants of the training and eval graphs in ``folder`` once, in ``INT4_WEIGHTS``.

    Both graphs hold the same INT4 weights as constants (an ORT checkpoint cannot hold INT4), so
    each file would carry its own copy; as ONNX external data (``location`` relative to the bundle
    folder, which ONNX Runtime resolves against the graph's own folder) they share one. The
    portable graphs, written from these, point at the same file (edgetune/export/portable/writer.py).
    Every bundle file is hashed in the manifest and every ``location`` is checked to stay inside
    the bundle (edgetune/bundle_paths.py), so the shared file is verified like the graphs.
    """
    from pathlib import Path

    from edgetune.export.artifacts import EVAL_MODEL, TRAINING_MODEL
    from edgetune.export.portable.writer import store_external

    folder = Path(folder)
    graphs = {name: onnx.load(str(folder / name)) for name in (TRAINING_MODEL, EVAL_MODEL)}
    store_external(graphs.values(), folder / INT4_WEIGHTS, select=lambda t: t.data_type == TensorProto.INT4)
    for name, model in graphs.items():
        onnx.save(model, str(folder / name))
