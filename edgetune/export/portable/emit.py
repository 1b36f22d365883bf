"""Building the standard nodes that stand in for one training operator.

A rule receives the node it replaces and an ``Emitter``; every value the emitter makes is named
under the replaced node's name, so the rewritten graph stays readable and names never collide.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


class NotPortable(Exception):
    """A node the rule cannot express in standard operators (e.g. an attribute value it does not
    handle); the node is then reported as unsupported, with this reason."""


# Reduce operators that took ``axes`` as an attribute before this opset and as an input from it on
# (ReduceSum moved at 13; int4 bundles' graphs are opset 21, the others 17).
AXES_AS_INPUT_FROM = {"ReduceMax": 18, "ReduceMean": 18, "ReduceMin": 18, "ReduceProd": 18, "ReduceSumSquare": 18,
                      "ReduceSum": 13}


class Emitter:
    def __init__(self, node: onnx.NodeProto, taken: set[str], constants: Callable[[str], np.ndarray | None],
                 opset: int = 17):
        self.node = node
        self.opset = opset  # the graph's default-domain opset: operators are emitted in its form
        self.constant = constants  # name -> value of a graph constant (initializer), else None
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken = taken  # every value and node name already in the graph (shared, grows)
        self._prefix = f"{node.name or node.op_type}/portable"

    def fresh(self, tag: str) -> str:
        name, k = f"{self._prefix}/{tag}", 1
        while name in self._taken:
            k += 1
            name = f"{self._prefix}/{tag}_{k}"
        self._taken.add(name)
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, domain: str = "", **attrs) -> str:
        """One node with one output (named ``out``, or a fresh name); returns the output's name."""
        return self.op_n(op_type, inputs, [out or self.fresh(op_type)], domain=domain, **attrs)[0]

    def op_n(self, op_type: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> list[str]:
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=self.fresh(f"{op_type}_node"),
                                           domain=domain, **attrs))
        return outputs

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        """``op_type`` (ReduceMax, ReduceMean, ...) over ``axes``, written as the graph's opset reads it."""
        if self.opset >= AXES_AS_INPUT_FROM[op_type]:
            return self.op(op_type, [x, self.const(axes)], keepdims=keepdims)
        return self.op(op_type, [x], axes=axes, keepdims=keepdims)

    def const(self, value, dtype=np.int64, tag: str = "const") -> str:
        """A constant tensor as an initializer of the rewritten graph."""
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), self.fresh(tag))
        self.initializers.append(tensor)
        return tensor.name

    def input(self, i: int) -> str:
        """The replaced node's i-th input name, "" when absent."""
        return self.node.input[i] if i < len(self.node.input) else ""

    def output(self, i: int) -> str:
        """The replaced node's i-th output name, "" when absent (an optional output not asked for)."""
        return self.node.output[i] if i < len(self.node.output) else ""


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default
