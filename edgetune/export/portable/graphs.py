"""From ONNX Runtime's training artifacts to self-contained graphs with the portable contract.

Gradient graph (from ``training_model.onnx``): inputs are the batch (input_ids, attention_mask,
labels; int64 (B, T)) and one float32 input per trainable tensor, named as in the manifest;
outputs are ``loss`` and ``<graph_name>_grad`` for each trainable tensor: the gradient of this one
micro-batch. The training artifacts instead add each gradient into a buffer that lives in the ORT
checkpoint (``InPlaceAccumulatorV2``, reset by the ``lazy_reset_grad`` input); those nodes and
inputs are removed here, and accumulating over micro-batches is the runtime's job.
Eval graph (from ``eval_model.onnx``): the same inputs, output ``loss``.
In both, every frozen tensor the ORT checkpoint holds becomes an initializer of the graph
(int8 weights stay int8 and are still read through their ``DequantizeLinear``).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

ACCUMULATOR = "InPlaceAccumulatorV2"


def gradient_graph(model: onnx.ModelProto, batch_inputs: list[str], trainable: list[str],
                   frozen: Mapping[str, np.ndarray], loss: str = "loss") -> dict[str, str]:
    """Turn a training model into the gradient graph in place; returns {graph_name: output name}."""
    graph = model.graph
    producer = {o for n in graph.node for o in n.output}
    accumulated = {n.input[1] for n in graph.node if n.op_type == ACCUMULATOR}  # the gradients they add up
    gradients = {name: f"{name}_grad" for name in trainable}
    missing = [n for n, g in gradients.items() if g not in accumulated or g not in producer]
    extra = accumulated - set(gradients.values())
    if missing or extra:  # the exporter's own graphs have exactly one per trainable tensor
        raise RuntimeError(f"training graph gradients do not match the manifest: missing {missing[:3]}, "
                           f"extra {sorted(extra)[:3]}")
    nodes = [n for n in graph.node if n.op_type != ACCUMULATOR]
    del graph.node[:]
    graph.node.extend(nodes)
    shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    del graph.output[:]
    graph.output.extend([_float_output(loss, [])] + [_float_output(g, shapes.get(n)) for n, g in gradients.items()])
    _inputs_and_initializers(graph, batch_inputs, trainable, frozen)
    return gradients


def eval_graph(model: onnx.ModelProto, batch_inputs: list[str], trainable: list[str],
               frozen: Mapping[str, np.ndarray]) -> None:
    _inputs_and_initializers(model.graph, batch_inputs, trainable, frozen)


def _inputs_and_initializers(graph: onnx.GraphProto, batch_inputs: list[str], trainable: list[str],
                             frozen: Mapping[str, np.ndarray]) -> None:
    """Keep the batch and trainable inputs (in that order); frozen inputs become initializers;
    the accumulation inputs (buffers, ``lazy_reset_grad``) go, as nothing reads them any more."""
    read = {i for n in graph.node for i in n.input}
    by_name = {i.name: i for i in graph.input}
    missing = [n for n in (*batch_inputs, *trainable) if n not in by_name]
    unknown = [i.name for i in graph.input if i.name not in (*batch_inputs, *trainable) and i.name not in frozen
               and i.name in read]
    if missing or unknown:
        raise RuntimeError(f"graph inputs do not match the bundle: missing {missing[:3]}, unknown {unknown[:3]}")
    keep = [by_name[n] for n in (*batch_inputs, *trainable)]
    graph.initializer.extend(numpy_helper.from_array(np.asarray(frozen[i.name]), i.name)
                             for i in graph.input if i.name in frozen and i.name in read and i.name not in trainable)
    del graph.input[:]
    graph.input.extend(keep)


def _float_output(name: str, shape) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)
