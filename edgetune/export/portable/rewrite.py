"""Rewrite a graph so the stock onnxruntime CPU build runs it: every operator outside
``stock_ops`` goes through its rule (``rules.RULES``); one without a rule, or whose rule cannot
express its configuration, is reported, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from edgetune.export.portable.emit import MS_DOMAIN, Emitter, NotPortable
from edgetune.export.portable.rules import RULES
from edgetune.export.portable.stock_ops import is_stock


@dataclass
class Unsupported:
    op_type: str
    node: str
    reason: str = "no rewrite rule"

    def to_dict(self) -> dict:
        return {"op_type": self.op_type, "node": self.node, "reason": self.reason}


def make_stock(model: onnx.ModelProto) -> tuple[int, list[Unsupported]]:
    """Rewrite ``model`` in place; returns (nodes rewritten, nodes that stay unsupported). With any
    unsupported node the model is only partly rewritten and must not be used."""
    graph = model.graph
    taken = {n.name for n in graph.node} | {v for n in graph.node for v in (*n.input, *n.output)}
    taken |= {t.name for t in graph.initializer} | {i.name for i in graph.input}
    initializers = {t.name: t for t in graph.initializer}

    def constant(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(initializers[name]) if name in initializers else None

    opset = next((o.version for o in model.opset_import if _domain(o.domain) == ""), 17)
    unsupported: list[Unsupported] = []
    rewritten = 0
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if is_stock(node.domain, node.op_type):
            nodes.append(node)
            continue
        fn = RULES.get((_domain(node.domain), node.op_type))
        if fn is None:
            unsupported.append(Unsupported(node.op_type, node.name))
            nodes.append(node)
            continue
        emitter = Emitter(node, taken, constant, opset)
        try:
            fn(node, emitter)
        except NotPortable as exc:
            unsupported.append(Unsupported(node.op_type, node.name, str(exc)))
            nodes.append(node)
            continue
        rewritten += 1
        nodes.extend(emitter.nodes)  # in place of the node: inputs come before, readers after
        graph.initializer.extend(emitter.initializers)
        initializers.update((t.name, t) for t in emitter.initializers)
    del graph.node[:]
    graph.node.extend(nodes)
    remove_dead_nodes(graph)
    del graph.value_info[:]  # types of values that no longer exist; onnxruntime infers the rest
    _keep_used_opsets(model)
    return rewritten, unsupported


def remove_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs is read (e.g. the gradient of a frozen norm weight, which
    the gradient builder computes but nothing uses), then initializers nothing reads."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):  # topological order: readers come after producers
        if any(o and o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_subgraph_inputs(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(used)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope values read inside If/Loop bodies (none in today's graphs; kept correct anyway)."""
    names = set()
    for a in node.attribute:
        for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in g.node:
                names.update(i for i in n.input if i)
                names.update(_subgraph_inputs(n))
    return names


def _domain(domain: str) -> str:
    return "" if domain == "ai.onnx" else domain


def _keep_used_opsets(model: onnx.ModelProto) -> None:
    """Declare only the domains the graph uses (the training build adds its own, e.g.
    ``ai.onnx.preview.training``, which a stock build need not know)."""
    used = {_domain(n.domain) for n in model.graph.node} | {""}
    kept = [o for o in model.opset_import if _domain(o.domain) in used]
    if MS_DOMAIN in used and not any(o.domain == MS_DOMAIN for o in kept):
        kept.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    del model.opset_import[:]
    model.opset_import.extend(kept)
