"""The index the memory rewrites (``memory.py``, ``memory_recompute.py``, ``memory_loss.py``) edit through.

Sorting, dead-node removal and attribute access are ``edgetune.onnx_graph``'s, shared with
quantize and merge.

The rewrites edit a Python list of ``NodeProto`` references and write it back once, topologically
sorted, at the end. Nodes are identified by their position in that list (protobuf wrappers have
no stable identity).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgetune.onnx_graph import toposort

# Slice ends added to a Size so that the slice never cuts anything, even when the Size is 0.
_NO_CUT = 1 << 62


class GraphIndex:
    """Producers, consumers and the forward/backward split of a training graph."""

    def __init__(self, graph: onnx.GraphProto, loss: str | None):
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.new_inits: list[onnx.TensorProto] = []
        self._names: set[str] = {o for n in self.nodes for o in n.output} | {i.name for i in graph.input} | {
            i.name for i in graph.initializer} | {n.name for n in self.nodes}  # one namespace: tensors and nodes
        self._ends: dict[str, str] = {}  # dependency tensor -> int64 (1,) slice end that depends on it
        self._const: dict[tuple, str] = {}
        self.reindex()
        # forward = every node the loss depends on; the rest is the gradient graph (and its helpers)
        self.forward = self.ancestors([loss]) if loss else set(range(len(self.nodes)))

    def reindex(self) -> None:
        self.producer: dict[str, int] = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)  # tensor -> [(node, input slot)]
        for i, n in enumerate(self.nodes):
            for j, name in enumerate(n.input):
                if name:
                    self.consumers[name].append((i, j))

    def ancestors(self, tensors) -> set[int]:
        """Indices of the nodes the given tensors depend on (transitively)."""
        seen: set[int] = set()
        stack = [self.producer[t] for t in tensors if t in self.producer]
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            stack.extend(self.producer[t] for t in self.nodes[i].input if t in self.producer)
        return seen

    def is_graph_value(self, name: str) -> bool:
        """A graph input or initializer (a parameter or constant), not a computed tensor."""
        return name not in self.producer

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self._names:
            name, k = f"{base}.{k}", k + 1
        self._names.add(name)
        return name

    def add(self, op: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        """Append a one-output node; returns its output tensor's name."""
        out = self.fresh(f"{name}_output")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.fresh(name), domain=domain or None, **attrs))
        return out

    def const(self, value: np.ndarray, name: str) -> str:
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self._const:
            self._const[key] = self.fresh(name)
            self.new_inits.append(numpy_helper.from_array(value, self._const[key]))
        return self._const[key]

    def copy(self, node: onnx.NodeProto, inputs: list[str], name: str) -> str:
        """Append a copy of one-output ``node`` (same op, domain, attributes) reading ``inputs``."""
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        return self.add(node.op_type, inputs, name, domain=node.domain, **attrs)

    def after(self, tensor: str, dependency: str, tag: str) -> str:
        """``tensor`` unchanged (a copy along axis 0), but computed only once ``dependency`` exists.

        ONNX Runtime runs a node as soon as its inputs allow in a reverse-DFS order it derives
        itself; a node that reads only parameters may run long before its consumer and keep its
        output alive meanwhile. ``Slice(tensor, 0, Size(dependency) + 2**62)`` reads the shape of
        ``dependency`` (never its values), so the order is forced and the data are exact. ``Size``
        rather than ``Shape``: ORT's ShapeInputMerge may swap the input of a ``Shape`` node for any
        tensor of the same symbolic shape, which would drop the dependency. Distinct inputs also
        keep CommonSubexpressionElimination from merging a copy back into the original.
        """
        zero = self.const(np.array([0], np.int64), "memory.axes0")
        return self.add("Slice", [tensor, zero, self.end_after(dependency, tag), zero], f"{tag}/After")

    def end_after(self, dependency: str, tag: str) -> str:
        """An int64 (1,) tensor, ``Size(dependency) + 2**62``: larger than any index, known only once
        ``dependency`` exists. ``Min(start, end_after(d))`` is ``start``, computed after ``d``."""
        if dependency not in self._ends:
            size = self.add("Size", [dependency], f"{tag}/Size")
            size1 = self.add("Unsqueeze", [size, self.const(np.array([0], np.int64), "memory.axes0")], f"{tag}/Unsqueeze")
            self._ends[dependency] = self.add("Add", [size1, self.const(np.array([_NO_CUT], np.int64), "memory.no_cut")],
                                              f"{tag}/End")
        return self._ends[dependency]

    def commit(self, drop: set[int] = frozenset()) -> None:
        """Write the node list back into the graph, minus ``drop``, in topological order."""
        keep = [n for i, n in enumerate(self.nodes) if i not in drop]
        self.graph.initializer.extend(self.new_inits)
        self.new_inits = []
        ordered = toposort(keep)
        del self.graph.node[:]
        self.graph.node.extend(ordered)
        self.nodes = list(self.graph.node)
        self.reindex()

