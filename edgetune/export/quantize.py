"""Weight-only int8 quantization of the frozen base, as an ONNX graph rewrite.

Each frozen fp32 weight W (out, in) is stored as int8 q (out, in) plus one fp32 scale per output
row (``edgetune.quantization``: symmetric, scale = max|W_row| / 127, zero point 0). The graph gets the fp32 values back
where they are used:
  * matrix use (MatMul/Gemm/Transpose): ``DequantizeLinear(q, scale, zp=0, axis=0)`` named like
    the original tensor, so every consumer is unchanged. The int8 zero point is explicit: without
    it ONNX Runtime types the output uint8 and the training model fails to load.
  * row lookup (Gather on the embedding table): ``Gather(q, ids) -> Cast -> Mul(Gather(scale, ids))``
    so only the looked-up rows are ever dequantized, never the whole (vocab, hidden) table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgetune.onnx_graph import attr, sort_graph
from edgetune.quantization import quantize_rows


@dataclass(frozen=True)
class QuantizedTensor:
    name: str  # original fp32 name (still produced inside the graph)
    q_name: str  # int8 initializer (out, in)
    scale_name: str  # fp32 initializer (out,)


def quantize_graph(model: onnx.ModelProto, names: list[str]) -> list[QuantizedTensor]:
    """Replace each named 2-D fp32 initializer by int8 + scale and the nodes that restore it."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    wanted = set(names)
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, inp in enumerate(node.input):
            if inp in wanted:
                consumers.setdefault(inp, []).append((node, i))
    new_nodes: list[onnx.NodeProto] = []
    done: list[QuantizedTensor] = []
    for name in names:
        w = numpy_helper.to_array(inits[name])
        q, scale = quantize_rows(w)
        qt = QuantizedTensor(name, f"{name}.int8", f"{name}.scale")
        graph.initializer.remove(inits[name])
        graph.initializer.extend([numpy_helper.from_array(q, qt.q_name), numpy_helper.from_array(scale, qt.scale_name)])
        zero = f"{name}.zero_point"
        graph.initializer.append(numpy_helper.from_array(np.zeros(w.shape[0], np.int8), zero))
        matrix_use = False
        for node, idx in consumers.get(name, []):
            if node.op_type == "Gather" and idx == 0 and attr(node, "axis", 0) == 0:
                new_nodes.extend(_gather_rows(node, qt))
            else:
                matrix_use = True
        if matrix_use:
            new_nodes.append(
                helper.make_node("DequantizeLinear", [qt.q_name, qt.scale_name, zero], [name], axis=0, name=f"{name}/DequantizeLinear")
            )
        done.append(qt)
    # ONNX wants nodes in topological order; the Gather rewrites read the ids that upstream nodes
    # produce, so re-sort rather than prepend.
    sort_graph(graph, new_nodes)
    return done


def _gather_rows(node: onnx.NodeProto, qt: QuantizedTensor) -> list[onnx.NodeProto]:
    """Gather(W, ids) -> Gather(q, ids) * Gather(scale, ids)[..., None], reusing the node's output."""
    ids, out = node.input[1], node.output[0]
    base = node.name or out
    rows_q, rows_f, scales, scales_u, axes = (f"{base}/{s}" for s in ("rows_q", "rows_f", "scales", "scales_u", "axes"))
    node.input[0] = qt.q_name
    node.output[0] = rows_q
    return [
        helper.make_node("Cast", [rows_q], [rows_f], to=TensorProto.FLOAT, name=f"{base}/Cast"),
        helper.make_node("Gather", [qt.scale_name, ids], [scales], axis=0, name=f"{base}/GatherScale"),
        helper.make_node("Constant", [], [axes], value=numpy_helper.from_array(np.array([-1], np.int64)), name=f"{base}/Axes"),
        helper.make_node("Unsqueeze", [scales, axes], [scales_u], name=f"{base}/Unsqueeze"),
        helper.make_node("Mul", [rows_f, scales_u], [out], name=f"{base}/Mul"),
    ]

