"""``edgetune export --compute int8``: the frozen projections multiply in int8, on the int8 weights.

Runs after the memory plan (``memory.private_dequantize``), which leaves every use of an int8
frozen weight W (out, in; int8 q with one fp32 scale s per output row, ``quantization.py``) as
its own ``DequantizeLinear`` feeding one of:

  forward         FusedMatMul(A, DQ(W), transB=1)   A (.., in)  -> (.., out) = A @ W^T
  input gradient  MatMul(dY, DQ(W))                 dY (.., out) -> (.., in) = dY @ W
                  (the LM head's: Gemm, its weight read through an alias Reshape, memory_loss.py)

Each becomes an int8 product ``P(A, B, b_scale)`` (A fp32 quantized at run time, B int8 (K, N),
b_scale (N,) or a scalar; below) that never materialises W in fp32:

  forward         P(A, Transpose(q), s)          B = W^T (in, out) is int8 with
                  one scale per output column, as the operators take it; the Transpose is an
                  int8 copy of one weight (a quarter of the fp32 copy it replaces), made right
                  before its use and freed after it (the LM head's chunks share one, as they
                  shared one fp32 copy before).
  input gradient  P(dY * s, q, 1)                W's scale lies on the reduction
                  axis (out), so it multiplies dY's columns first; q (out, in) is then B as stored.

The embedding lookup already reads int8 rows (``quantize.py``: Gather, Cast, Mul by the rows'
scales), exactly; with tied embeddings the LM head is one more frozen projection, rewritten above.

How A (activations forward, column-scaled gradients backward) is quantized was measured on
SmolLM2-135M, one step on 1,100 real tokens (``bench/int8_error.py``; README, Performance):

  per row (the export's)  symmetric int8, one scale per row (token): max|A_row| / 127; the int32
                          products come back through ``MatMulIntegerToFloat`` (com.microsoft)
                          times the weight's column scales, then times the row scales.
                          Loss +2.4 %, LoRA gradients 62 % off (relative norm). The kernel gets
                          the row's integers as uint8 + 128 with zero point 128 (same products):
                          ONNX Runtime's x86 int8 x int8 GEMM is portable C, its uint8 x int8 one
                          uses AVX2/AVX-512/VNNI (``bench/int8_kernels.py``: 17x at these shapes).
                          Exact with VNNI and on ARM64; x86 without VNNI sums pairs of products in
                          a saturating int16 and clips some (``bench/int8_saturation.py``, README).
  per tensor              ``DynamicQuantizeMatMul`` (com.microsoft): uint8 with a zero point, one
                          scale for the whole tensor. Loss +45 %, gradients 179 % off: a few
                          tokens with large activations leave the rest a handful of levels.

Both operators run in the training build (1.19.2) and in every stock onnxruntime CPU build (since
1.6 / 1.7), so the portable graphs need no rewrite for them. The LoRA path, the loss, the
optimizer and every other operator stay fp32: only products with a frozen int8 weight change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edgetune.export.memory_graph import GraphIndex
from edgetune.export.memory_loss import PREFIX
from edgetune.onnx_graph import attr

MS_DOMAIN = "com.microsoft"
GRANULARITIES = ("tensor", "row")
A_ZERO = 128  # per-row activations travel as uint8 with this zero point (see _product)


@dataclass
class ComputeReport:
    """What the rewrite changed (the manifest's ``producer.compute``)."""

    granularity: str = "row"
    forward: int = 0  # int8 forward products
    input_gradient: int = 0  # int8 input-gradient products
    left: list[str] = field(default_factory=list)  # weight uses that still dequantize, with the reader

    def to_dict(self) -> dict:
        return {"matmul": "int8", "activations": f"per-{self.granularity}", "forward": self.forward,
                "input_gradient": self.input_gradient, "left": self.left}


def rewrite_artifacts(folder: Path | str, granularity: str = "row", **only) -> ComputeReport:
    """Rewrite ``training_model.onnx`` and ``eval_model.onnx`` in ``folder`` in place."""
    folder = Path(folder)
    report = ComputeReport(granularity)
    for name, loss in (("training_model.onnx", "loss"), ("eval_model.onnx", None)):
        model = onnx.load(str(folder / name))
        counts = int8_matmuls(model, loss, granularity, **only)
        if loss is not None:  # the training graph's counts (the eval graph's are its forward ones)
            report.forward, report.input_gradient, report.left = counts.forward, counts.input_gradient, counts.left
        onnx.save(model, str(folder / name))
    return report


def int8_matmuls(model: onnx.ModelProto, loss: str | None, granularity: str = "row", head: bool = True,
                 input_gradient: bool = True) -> ComputeReport:
    """The rewrite on one model (see the module docstring). ``head`` False keeps the LM head (the
    weight whose rows are also gathered: the tied embedding, or one read through the loss chunks'
    alias) exact; ``input_gradient`` False keeps the backward products exact (for measurements)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    report = ComputeReport(granularity)
    graph = model.graph
    g = GraphIndex(graph, loss)
    int8_values = {i.name for i in graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.INT8}
    int8_values |= {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    identity_shapes = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT64
                       and list(onnx.numpy_helper.to_array(t).ravel()) == [0, -1]}
    drop: set[int] = set()
    aliases: set[int] = set()
    for d in range(len(g.nodes)):  # not the nodes this loop appends
        dq = g.nodes[d]
        if not _weight_dq(g, dq, int8_values):
            continue
        q, scale = dq.input[0], dq.input[1]
        # the int8 scheme is symmetric (quantization.py): every stored zero point is 0, and one scalar
        # zero fits both layouts (a per-row (out,) zero point would not fit the input gradient's B)
        zero = g.const(np.array(0, np.int8), "compute_int8.zero_point")
        kept, qt = False, None
        readers = list(_weight_readers(g, dq, identity_shapes))
        if not head and any(alias is not None or g.nodes[c].op_type == "Gather" or g.nodes[c].name.startswith(PREFIX)
                            for c, _, alias in readers):
            continue  # the LM head (and the tied embedding's lookup) keeps its DequantizeLinear
        for c, slot, alias in readers:
            node = g.nodes[c]
            if _forward(node, slot):
                if qt is None:  # one per DQ: the LM head's loss chunks share theirs, as they shared the DQ
                    # made only once the DQ's scale exists, which the memory plan already gates on the
                    # (first) use's input: the int8 copy exists right before its use, not from the start
                    ready = scale if not g.is_graph_value(scale) else node.input[0]
                    qt = g.add("Transpose", [g.after(q, ready, f"{dq.name}/int8")], f"{dq.name}/int8/Transpose",
                               perm=[1, 0])
                _product(g, node, node.input[0], qt, scale, zero, granularity)
                report.forward += 1
            elif _input_gradient(node, slot) and input_gradient:
                scaled = g.add("Mul", [node.input[0], scale], f"{dq.name}/int8/ScaleColumns")  # dY (.., out) * s (out,)
                _product(g, node, scaled, q, g.const(np.array(1.0, np.float32), "compute_int8.one"), zero, granularity)
                report.input_gradient += 1
            else:
                kept = True
                report.left.append(f"{node.op_type} {node.name}")
                continue
            if alias is not None:
                aliases.add(alias)
        if not kept:
            drop.add(d)
            drop.update(aliases)
        aliases.clear()
    g.commit(drop)
    return report


def _weight_readers(g: GraphIndex, dq: onnx.NodeProto, identity_shapes: set[str]):
    """(node, input slot, alias node or None) for every reader of the weight ``dq`` dequantizes.

    The loss chunks read the LM head through ``Reshape(DQ(W), [0, -1])`` (memory_loss.py: one
    shared copy behind an alias); its readers count as readers of W.
    """
    for c, slot in list(g.consumers[dq.output[0]]):
        node = g.nodes[c]
        if node.op_type == "Reshape" and slot == 0 and node.input[1] in identity_shapes:
            yield from ((r, j, c) for r, j in list(g.consumers[node.output[0]]))
        else:
            yield c, slot, None


def _weight_dq(g: GraphIndex, node: onnx.NodeProto, int8_values: set[str]) -> bool:
    """A per-row DequantizeLinear of a stored int8 weight (its scale may be gated by the memory
    plan's ``after``, so only the weight itself must be a graph value)."""
    return (node.op_type == "DequantizeLinear" and len(node.input) == 3 and node.input[0] in int8_values
            and g.is_graph_value(node.input[0]) and int(attr(node, "axis", 1)) == 0
            and attr(node, "block_size", 0) in (0, None))


def _plain(node: onnx.NodeProto) -> bool:
    return (not attr(node, "transA", 0) and not attr(node, "transBatchA", 0) and not attr(node, "transBatchB", 0)
            and float(attr(node, "alpha", 1.0)) == 1.0)


def _forward(node: onnx.NodeProto, slot: int) -> bool:
    """A @ W^T: ``FusedMatMul(A, W, transB=1)`` with nothing else set."""
    return node.op_type == "FusedMatMul" and slot == 1 and int(attr(node, "transB", 0)) == 1 and _plain(node)


def _input_gradient(node: onnx.NodeProto, slot: int) -> bool:
    """dY @ W: a plain ``MatMul(dY, W)``, or a FusedMatMul / two-input Gemm with nothing set."""
    if slot != 1:
        return False
    if node.op_type == "Gemm":
        return (len([i for i in node.input if i]) == 2 and not attr(node, "transA", 0) and not attr(node, "transB", 0)
                and float(attr(node, "alpha", 1.0)) == 1.0)
    return node.op_type == "MatMul" or (node.op_type == "FusedMatMul" and not attr(node, "transB", 0) and _plain(node))


def _product(g: GraphIndex, node: onnx.NodeProto, a: str, b: str, b_scale: str, b_zero: str, granularity: str) -> None:
    """Turn ``node`` into A (.., K) fp32 @ B (K, N) int8 * b_scale (N,) or (), A quantized dynamically."""
    del node.attribute[:]
    node.domain = MS_DOMAIN
    if granularity == "tensor":  # uint8 A with a zero point, one scale for the tensor
        node.op_type = "DynamicQuantizeMatMul"
        node.input[:] = [a, b, b_scale, b_zero]
        return
    # per row: a_scale (.., 1) = max|A_row| / 127 (1 for an all-zero row), A_s8 = round(A / a_scale) in
    # [-127, 127], handed to the kernel as uint8 A_s8 + 128 with zero point 128: the same integers, but
    # ONNX Runtime's x86 kernels multiply uint8 x int8 with VNNI/AVX2 and int8 x int8 only in portable C
    # (AVX-VNNI-INT8 CPUs aside), 17x slower at these shapes (README, "Where an int8 step's time goes")
    tag = node.name or "int8"
    amax = g.add("ReduceMax", [g.add("Abs", [a], f"{tag}/Abs")], f"{tag}/RowMax", axes=[-1], keepdims=1)
    zero_row = g.add("Equal", [amax, g.const(np.array(0.0, np.float32), "compute_int8.zero")], f"{tag}/ZeroRow")
    a_scale = g.add("Where", [zero_row, g.const(np.array(1.0, np.float32), "compute_int8.one"),
                              g.add("Div", [amax, g.const(np.array(127.0, np.float32), "compute_int8.qmax")], f"{tag}/Div")],
                    f"{tag}/RowScale")
    # A_s8 + 128 = QuantizeLinear(A, a_scale, 128) (round half to even, as Round; one pass instead of
    # Div, Round, Add, Cast: 5-8x less time). Its per-axis form takes a 1-D scale and zero point along
    # one axis, so A goes in as (rows, K) (Flatten: a view) and comes back in its own shape.
    rows = g.add("Flatten", [a], f"{tag}/Rows", axis=-1)  # (.., K) -> (M, K)
    row_scale = g.add("Reshape", [a_scale, g.const(np.array([-1], np.int64), "compute_int8.flat")], f"{tag}/RowScales")
    row_zero = g.add("Expand", [g.const(np.array(A_ZERO, np.uint8), "compute_int8.a_zero"),
                                g.add("Shape", [row_scale], f"{tag}/Rows/Shape")], f"{tag}/RowZeros")  # (M,)
    a_q = g.add("Reshape", [g.add("QuantizeLinear", [rows, row_scale, row_zero], f"{tag}/ToUint8", axis=0),
                            g.add("Shape", [a], f"{tag}/Shape")], f"{tag}/Unflatten")
    product = g.add("MatMulIntegerToFloat", [a_q, b, g.const(np.array(1.0, np.float32), "compute_int8.one"), b_scale,
                                             g.const(np.array(A_ZERO, np.uint8), "compute_int8.a_zero")],  # B's: 0
                    f"{tag}/MatMulIntegerToFloat", domain=MS_DOMAIN)
    node.op_type, node.domain = "Mul", ""
    node.input[:] = [product, a_scale]
