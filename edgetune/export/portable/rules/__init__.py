"""The rewrite rules: one per training operator the stock onnxruntime CPU build cannot run.

``RULES[(domain, op_type)]`` is a function ``rule(node, emitter)`` that emits standard ONNX nodes
(or contrib operators the stock build has, ``stock_ops.STOCK_OPS``) computing the node's outputs
under the same names. A rule raises ``NotPortable`` for a configuration it does not cover.
Each rule is checked against the training build's own operator in tests/test_portable_rules.py.
"""

from __future__ import annotations

from typing import Callable

import onnx

from edgetune.export.portable.emit import Emitter

Rule = Callable[[onnx.NodeProto, Emitter], None]
RULES: dict[tuple[str, str], Rule] = {}


def rule(op_type: str, domain: str = "com.microsoft") -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        RULES[(domain, op_type)] = fn
        return fn

    return register


# registration happens on import; order does not matter
from edgetune.export.portable.rules import activations, loss, norms, shapes  # noqa: E402,F401
