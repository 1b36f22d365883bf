"""Small, exact simplifications of the exported training graph before ``generate_artifacts``.

* ``Dropout`` with ratio 0 (attention dropout of a pretrained model) becomes ``Identity``: in a
  training-mode graph it would still draw a random mask and keep it alive for the backward pass,
  (B, heads, T, T) bytes per layer, for no effect.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from edgetune.onnx_graph import attr


def _ratio(node: onnx.NodeProto, constants: dict) -> float | None:
    if len(node.input) < 2 or not node.input[1]:
        return 0.5 if attr(node, "ratio") is None else None
    value = constants.get(node.input[1])
    return None if value is None else float(value)


def remove_zero_dropout(model: onnx.ModelProto) -> int:
    """Replace ratio-0 Dropout nodes by Identity on their first output; returns how many."""
    graph = model.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer if not i.dims}
    for node in graph.node:
        if node.op_type == "Constant" and attr(node, "value") is not None:
            constants[node.output[0]] = numpy_helper.to_array(attr(node, "value"))
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    replaced = 0
    for i, node in enumerate(graph.node):
        if node.op_type != "Dropout" or _ratio(node, constants) != 0.0:
            continue
        if len(node.output) > 1 and node.output[1] in used:
            continue  # someone reads the mask; leave it
        graph.node[i].CopyFrom(helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name))
        replaced += 1
    return replaced


def expose_layer_norm_statistics(model: onnx.ModelProto) -> int:
    """Give every ``LayerNormalization`` its optional Mean and InvStdDev outputs; returns how many.

    The TorchScript exporter writes only Y, but ONNX Runtime's gradient builder reads outputs 1 and
    2 for ``LayerNormalizationGrad`` and fails without them ("i < node_->OutputDefs().size()").
    The values are what the node computes anyway; Y is unchanged.
    """
    count = 0
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            base = node.name or node.output[0]
            node.output.extend([f"{base}/mean", f"{base}/inv_std_dev"])
            count += 1
    return count
