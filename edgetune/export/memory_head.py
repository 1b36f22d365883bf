"""The LM head's products in vocabulary slices, each slice dequantized right before its product.

Without it (``memory_loss._share_head_weight``) the loss chunks read one fp32 copy of the int8
head weight W (V, H), alive from chunk 0's forward to the last chunk's backward, which is where
the step's stored activations peak too. That copy is V x H x 4 bytes: 113 MB for SmolLM2-135M
(49,152 x 576), but 1.05 GB for a Llama-3.2-1B-sized model (128,256 x 2,048), as much as the
whole int4 base. Here every product with W is split along the vocabulary into S slices of
``V / S`` rows, each read through its own ``DequantizeLinear`` of the int8 rows of that slice:

  forward   logits_k = FusedMatMul(h_k, W, transB=1)            (rows, V)
        ->  Concat_s FusedMatMul(h_k, DQ(q[s], scale[s]), transB=1)   along V
  backward  dh_k = Gemm(dlogits_k, W)                            (rows, H)
        ->  sum_s Gemm(dlogits_k[:, s], DQ(q[s], scale[s]))

Slice s + 1 is dequantized only after slice s's product exists (its ``Slice`` start is
``Min(start, GraphIndex.end_after(previous product))``), so one fp32 slice is alive at a time.
The price is time: W is dequantized twice per loss chunk instead of once per step (the default
8 chunks: 16 passes over a 1B model's 263 M int8 values). Forward values are the same dot products;
the backward sums over the vocabulary in S pieces (float rounding, about 1e-7 relative).
Hence ``auto`` slices only heads whose fp32 copy exceeds ``AUTO_FROM_BYTES``.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from edgetune.export.memory_graph import GraphIndex
from edgetune.onnx_graph import attr

SLICE_BYTES = 64 << 20  # auto: fp32 bytes of one dequantized slice at most
AUTO_FROM_BYTES = 256 << 20  # auto: slice heads whose fp32 copy is larger (1B-class models, not 135M/360M)


def auto_slices(vocab: int, hidden: int) -> int:
    """``--head-slices auto``: 0 (one shared copy) for small heads, else slices of <= ``SLICE_BYTES``."""
    fp32 = vocab * hidden * 4
    return 0 if fp32 <= AUTO_FROM_BYTES else math.ceil(fp32 / SLICE_BYTES)


def sliceable(g: GraphIndex, dq: onnx.NodeProto, readers: list[tuple[int, int]]) -> bool:
    """An int8 per-row DQ (axis 0, 1-D scale) whose readers are the chunks' forward/backward products."""
    if dq.op_type != "DequantizeLinear" or int(attr(dq, "axis", 1)) != 0 or attr(dq, "block_size", 0):
        return False
    for i, j in readers:
        n = g.nodes[i]
        forward = (n.op_type == "FusedMatMul" and j == 1 and int(attr(n, "transB", 0)) == 1
                   and not attr(n, "transA", 0) and not attr(n, "transBatchA", 0) and not attr(n, "transBatchB", 0))
        backward = n.op_type == "Gemm" and j == 1 and len(n.input) == 2 and not attr(n, "transA", 0) \
            and not attr(n, "transB", 0)
        if not (forward or backward):
            return False
    return True


def slice_products(g: GraphIndex, dq: onnx.NodeProto, scale: str, readers: list[tuple[int, int]],
                   vocab: int, slices: int) -> set[int]:
    """Rewrite each reader of ``DQ(q)`` into ``slices`` vocabulary slices; returns the readers to drop.

    ``scale`` is the DQ's (V,) scale input (possibly gated); q is (V, H) int8, zero point (V,).
    """
    q, _, zero = (list(dq.input) + [""])[:3]
    edges = [round(k * vocab / slices) for k in range(slices + 1)]

    def c(values, name):
        return g.const(np.array(values, np.int64), f"memory.head_slice/{name}")

    def weight(s: int, start: str, tag: str) -> str:
        """(V_s, H) fp32: DQ of rows edges[s]:edges[s+1]; ``start`` is edges[s], known only once the
        previous product exists, so the slice is dequantized right before its own product."""
        end, axis = c([edges[s + 1]], f"end{s}"), c([0], "axis0")
        parts = [g.add("Slice", [t, start, end, axis], f"{tag}/{what}") for t, what in ((q, "Rows"), (scale, "Scales"))]
        if zero:
            parts.append(g.add("Slice", [zero, start, end, axis], f"{tag}/ZeroPoints"))
        return g.add("DequantizeLinear", parts, f"{tag}/DequantizeLinear", axis=0)

    for i, _ in readers:
        n = g.nodes[i]
        tag = f"{n.name}/head_slice"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        x, out = n.input[0], n.output[0]
        dependency, pieces = x, []
        for s in range(slices):
            start = g.add("Min", [c([edges[s]], f"start{s}"), g.end_after(dependency, f"{tag}{s}")], f"{tag}{s}/Start")
            w = weight(s, start, f"{tag}{s}")
            if n.op_type == "FusedMatMul":  # (rows, H) x (V_s, H)^T -> (rows, V_s)
                piece = g.add("FusedMatMul", [x, w], f"{tag}{s}/FusedMatMul", domain=n.domain, **attrs)
            else:  # Gemm: (rows, V_s) x (V_s, H) -> (rows, H), this slice's share of dh
                cols = g.add("Slice", [x, start, c([edges[s + 1]], f"end{s}"), c([1], "axis1")], f"{tag}{s}/Columns")
                piece = g.add("Gemm", [cols, w], f"{tag}{s}/Gemm", **attrs)
                if pieces:  # running sum: one (rows, H) partial alive, not S of them
                    piece = g.add("Add", [pieces[-1], piece], f"{tag}{s}/Sum")
            pieces.append(piece)
            dependency = piece
        if n.op_type == "FusedMatMul":
            g.nodes.append(onnx.helper.make_node("Concat", pieces, [out], name=g.fresh(f"{tag}/Concat"), axis=-1))
        else:
            g.nodes.append(onnx.helper.make_node("Identity", [pieces[-1]], [out], name=g.fresh(f"{tag}/Result")))
    return {i for i, _ in readers}


def initializer_dims(graph: onnx.GraphProto, name: str) -> list[int] | None:
    """Shape of a stored tensor: an initializer, or a graph input (ORT training graphs take their
    frozen parameters as inputs, filled from the checkpoint); None if unknown or symbolic."""
    for t in graph.initializer:
        if t.name == name:
            return list(t.dims)
    for v in graph.input:
        if v.name == name and v.type.HasField("tensor_type"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            return None if None in dims else dims
    return None
