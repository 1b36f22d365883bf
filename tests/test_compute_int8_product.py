"""One per-row int8 product of ``compute_int8._product``, against integer arithmetic in numpy.

A two-product graph (the forward ``FusedMatMul(A, DQ(W), transB=1)`` and the input gradient
``MatMul(dY, DQ(W))``, as the training graph has them) is rewritten by ``int8_matmuls`` and run in
ONNX Runtime. The reference quantizes each row symmetrically, a_q = round(A / (max|A_row| / 127))
(numpy rounds half to even, as ONNX ``Round`` does), multiplies the integers exactly in int64 and
scales the result by the weight's and the row's scales. The graph hands a_q to the kernel as uint8
a_q + 128 with zero point 128 (ONNX Runtime's fast x86 path), computed by one per-axis
``QuantizeLinear``; the integers are the same, so the outputs must agree to float32 rounding of the
final scaling, far below one quantization step.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgetune.export.compute_int8 import A_ZERO, MS_DOMAIN, int8_matmuls

IN, OUT, ROWS = 48, 40, 7


def _graph(q: np.ndarray, scale: np.ndarray) -> onnx.ModelProto:
    """y = A @ DQ(q)^T (A (2, ROWS, IN)); dx = dY @ DQ(q) (dY (2, ROWS, OUT)); q (OUT, IN) int8, per-row scale."""
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["w"], name="dq", axis=0),
        helper.make_node("FusedMatMul", ["a", "w"], ["y"], name="proj/MatMul", domain=MS_DOMAIN, transB=1),
        helper.make_node("MatMul", ["dy", "w"], ["dx"], name="proj/MatMul_Grad"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, ROWS, IN]),
         helper.make_tensor_value_info("dy", TensorProto.FLOAT, [2, ROWS, OUT])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, ROWS, OUT]),
         helper.make_tensor_value_info("dx", TensorProto.FLOAT, [2, ROWS, IN])],
        initializer=[numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "scale"),
                     numpy_helper.from_array(np.zeros(OUT, np.int8), "zp")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])


def _per_row(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    amax = np.abs(a).max(axis=-1, keepdims=True)
    a_scale = np.where(amax == 0, np.float32(1), amax / np.float32(127)).astype(np.float32)
    return np.round(a / a_scale).astype(np.int64), a_scale


def _inputs(rng) -> tuple[np.ndarray, np.ndarray]:
    a = rng.standard_normal((2, ROWS, IN)).astype(np.float32)
    a[0, 0] = 0  # an all-zero row (scale 1, not 0/0)
    a[0, 1] *= 1e4  # rows far apart in magnitude, each with its own scale
    a[0, 2, :4] = [127.0, -127.0, 0.5, -1.5]  # extremes of the range and ties that round to even
    dy = rng.standard_normal((2, ROWS, OUT)).astype(np.float32)
    dy[1, 3] *= 1e-6
    return a, dy


def test_per_row_product_equals_integer_arithmetic():
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (OUT, IN), dtype=np.int8)
    q[0, :] = 127  # a weight row at the top of the range with all activations' pairs of one sign
    scale = (rng.random(OUT).astype(np.float32) + 0.5) / 127
    model = _graph(q, scale)
    report = int8_matmuls(model, None)
    assert (report.forward, report.input_gradient, report.left) == (1, 1, [])
    onnx.checker.check_model(model)

    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a, dy = _inputs(rng)
    y, dx = session.run(["y", "dx"], {"a": a, "dy": dy})

    a_q, a_s = _per_row(a)  # forward: A @ W^T with W = q * scale[:, None]
    y_ref = (a_q @ q.astype(np.int64).T).astype(np.float64) * scale * a_s
    g_q, g_s = _per_row(dy * scale)  # input gradient: the weight's row scales fold into dY's columns
    dx_ref = (g_q @ q.astype(np.int64)).astype(np.float64) * g_s
    for got, ref in ((y, y_ref), (dx, dx_ref)):
        assert got.shape == ref.shape
        assert np.allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max()), np.abs(got - ref).max()
    assert np.all(y[0, 0] == 0)  # the zero row stays exactly zero


def test_activations_reach_the_kernel_as_uint8_with_zero_point_128():
    """ONNX Runtime multiplies int8 x int8 in portable C on x86 (no VNNI path before AVX-VNNI-INT8):
    every per-row product must hand the kernel uint8 A, with the zero point that makes it a_q + 128."""
    q = np.random.default_rng(1).integers(-127, 128, (OUT, IN), dtype=np.int8)
    model = _graph(q, np.full(OUT, 0.01, np.float32))
    int8_matmuls(model, None)
    graph = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    products = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(products) == 2
    for node in products:
        assert types[node.input[0]] == TensorProto.UINT8
        zero = consts[node.input[4]]
        assert zero.dtype == np.uint8 and zero.shape == () and int(zero) == A_ZERO
        assert len(node.input) == 5  # B's zero point absent: 0, the symmetric weights'
