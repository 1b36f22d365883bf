"""The matrix products of an int8-compute training step, one kernel at a time, against fp32 ``MatMul``.

    python bench/int8_kernels.py [--threads 1] [--runs 20] [--shapes 512x576x576,64x576x49152]

Each variant is a one-node (or few-node) ONNX graph in a plain ``InferenceSession`` (whatever
``onnxruntime`` is installed: the training build or a stock one), timed as the median of ``--runs``
runs after two warm-ups; the right operand B is a graph *input* (as in the training graph, where
it comes from a DequantizeLinear or a Transpose at run time, so ONNX Runtime cannot pre-pack it)
unless the variant says ``const``. Shapes are M x K x N: A (M, K) @ B (K, N). The defaults are
SmolLM2-135M's at 4 x 128 tokens: the projections (512 tokens, hidden 576, k/v 192, MLP 1,536),
their input gradients (K and N swapped) and one LM-head loss chunk (64 positions x 49,152).

Variants (GOP/s counts 2 M K N per product):

  fp32             MatMul, fp32 A and B
  s8s8             MatMulInteger, int8 A, int8 B (what ``--compute int8`` exported first)
  u8s8             MatMulInteger, uint8 A (zero point 128), int8 B
  s8s8 const       s8s8 with B an initializer (pre-packed at session start)
  u8s8 const       u8s8 with B an initializer
  itf s8s8         MatMulIntegerToFloat, int8 A (the int32 -> fp32 scaling fused)
  itf u8s8         MatMulIntegerToFloat, uint8 A with zero point 128
  dqmm             DynamicQuantizeMatMul (fp32 A quantized per tensor to uint8 inside the kernel)
  row chain s8     the whole per-row product of ``export/compute_int8.py`` before this benchmark:
                   abs-max per row, scale, divide, round, cast to int8, Transpose of B (N, K) int8,
                   MatMulIntegerToFloat, times the row scales
  row chain u8     the same with uint8 A (Round, +128, Cast to uint8; zero point 128) and B (k, n)
                   as given (no Transpose)
  row chain ql     row chain u8 with one per-axis QuantizeLinear instead of Div, Round, Add, Cast
                   (the rewrite's current form, ``compute_int8._product``)
  row chain pn     exact on every x86 kernel (no int16 pair can pass 2 * 127 * 127): A's integers
                   split into uint8 p = max(a, 0) and n = max(-a, 0) (two QuantizeLinear, zero point
                   0), two products, p @ B - n @ B; twice the int8 GEMM work (not exported)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

DEFAULT_SHAPES = "512x576x576,512x576x192,512x576x1536,512x1536x576,512x192x576,64x576x49152,64x49152x576"
F, I8, U8 = TensorProto.FLOAT, TensorProto.INT8, TensorProto.UINT8
MS = "com.microsoft"


def _model(nodes, inputs, output, output_type, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(output, output_type, None)],
                              initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])


def _scalar(name, value, dtype):
    return numpy_helper.from_array(np.array(value, dtype), name)


def variants(m: int, k: int, n: int, rng) -> dict:
    """name -> (model, feeds) for A (m, k) @ B (k, n)."""
    a = rng.standard_normal((m, k), dtype=np.float32)
    b8 = rng.integers(-127, 128, (k, n), dtype=np.int8)
    a_s8 = rng.integers(-127, 128, (m, k), dtype=np.int8)
    a_u8 = (a_s8.astype(np.int16) + 128).astype(np.uint8)
    vi = helper.make_tensor_value_info
    out = {}
    out["fp32"] = (_model([helper.make_node("MatMul", ["a", "b"], ["y"])], [vi("a", F, [m, k]), vi("b", F, [k, n])], "y", F),
                   {"a": a, "b": rng.standard_normal((k, n), dtype=np.float32)})
    for signed, a_q, a_type in ((True, a_s8, I8), (False, a_u8, U8)):
        tag = "s8s8" if signed else "u8s8"
        zero_a = _scalar("za", 0 if signed else 128, np.int8 if signed else np.uint8)
        ins = ["a", "b", "za", "zb"]
        inits = [zero_a, _scalar("zb", 0, np.int8)]
        out[tag] = (_model([helper.make_node("MatMulInteger", ins, ["y"])], [vi("a", a_type, [m, k]), vi("b", I8, [k, n])],
                           "y", TensorProto.INT32, inits), {"a": a_q, "b": b8})
        out[f"{tag} const"] = (_model([helper.make_node("MatMulInteger", ins, ["y"])], [vi("a", a_type, [m, k])], "y",
                                      TensorProto.INT32, [*inits, numpy_helper.from_array(b8, "b")]), {"a": a_q})
        itf = helper.make_node("MatMulIntegerToFloat", ["a", "b", "sa", "sb", "za", "zb"], ["y"], domain=MS)
        out[f"itf {tag}"] = (_model([itf], [vi("a", a_type, [m, k]), vi("b", I8, [k, n])], "y", F,
                                    [*inits, _scalar("sa", 1.0, np.float32),
                                     numpy_helper.from_array(np.full(n, 0.01, np.float32), "sb")]), {"a": a_q, "b": b8})
    out["dqmm"] = (_model([helper.make_node("DynamicQuantizeMatMul", ["a", "b", "sb", "zb"], ["y"], domain=MS)],
                          [vi("a", F, [m, k]), vi("b", I8, [k, n])], "y", F,
                          [numpy_helper.from_array(np.full(n, 0.01, np.float32), "sb"), _scalar("zb", 0, np.int8)]),
                   {"a": a, "b": b8})
    for form in ("s8", "u8", "ql", "pn"):
        nodes, inits = _row_chain(n, form)
        signed = form == "s8"
        feeds = {"a": a, "b": np.ascontiguousarray(b8.T) if signed else b8}
        out[f"row chain {form}"] = (
            _model(nodes, [vi("a", F, [m, k]), vi("b", I8, [n, k] if signed else [k, n])], "y", F, inits), feeds)
    return out


def _row_chain(n: int, form: str):
    """A (m, k) fp32 quantized per row, times B int8. ``form`` s8: int8 A, B read through a Transpose
    of its (n, k) layout; u8: uint8 A (zero point 128) on B (k, n) as given; ql: u8 with QuantizeLinear;
    pn: A's positive and negative parts as two uint8 products (module docstring)."""
    mk = helper.make_node
    nodes = [mk("Abs", ["a"], ["abs"]), mk("ReduceMax", ["abs"], ["amax"], axes=[-1], keepdims=1),
             mk("Equal", ["amax", "zero"], ["isz"]), mk("Div", ["amax", "qmax"], ["s0"]),
             mk("Where", ["isz", "one", "s0"], ["sa_row"])]
    inits = [_scalar("zero", 0.0, np.float32), _scalar("one", 1.0, np.float32), _scalar("qmax", 127.0, np.float32),
             numpy_helper.from_array(np.full(n, 0.01, np.float32), "sb"), _scalar("zb", 0, np.int8)]
    b = "b"
    if form == "pn":
        nodes += [mk("Reshape", ["sa_row", "flat"], ["sv"]), mk("Shape", ["sv"], ["svs"]), mk("Expand", ["za", "svs"], ["zv"]),
                  mk("QuantizeLinear", ["a", "sv", "zv"], ["ap"], axis=0), mk("Neg", ["a"], ["na"]),
                  mk("QuantizeLinear", ["na", "sv", "zv"], ["an"], axis=0),
                  mk("MatMulIntegerToFloat", ["ap", b, "one", "sb"], ["pp"], domain=MS),
                  mk("MatMulIntegerToFloat", ["an", b, "one", "sb"], ["pm"], domain=MS),
                  mk("Sub", ["pp", "pm"], ["p"]), mk("Mul", ["p", "sa_row"], ["y"])]
        inits += [_scalar("za", 0, np.uint8), numpy_helper.from_array(np.array([-1], np.int64), "flat")]
        return nodes, inits
    if form == "ql":
        nodes += [mk("Reshape", ["sa_row", "flat"], ["sv"]), mk("Shape", ["sv"], ["svs"]), mk("Expand", ["za", "svs"], ["zv"]),
                  mk("QuantizeLinear", ["a", "sv", "zv"], ["aq"], axis=0)]
        inits += [_scalar("za", 128, np.uint8), numpy_helper.from_array(np.array([-1], np.int64), "flat")]
    else:
        nodes += [mk("Div", ["a", "sa_row"], ["ad"]), mk("Round", ["ad"], ["ar"])]
    if form == "s8":
        nodes += [mk("Cast", ["ar"], ["aq"], to=I8), mk("Transpose", ["b"], ["bt"], perm=[1, 0])]
        inits.append(_scalar("za", 0, np.int8))
        b = "bt"
    elif form == "u8":
        nodes += [mk("Add", ["ar", "half"], ["ah"]), mk("Cast", ["ah"], ["aq"], to=U8)]
        inits += [_scalar("za", 128, np.uint8), _scalar("half", 128.0, np.float32)]
    nodes += [mk("MatMulIntegerToFloat", ["aq", b, "one", "sb", "za", "zb"], ["p"], domain=MS),
              mk("Mul", ["p", "sa_row"], ["y"])]
    return nodes, inits


def time_model(model, feeds, threads: int, runs: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(2):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Variants: see the module docstring.")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per variant; the median is reported")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated MxKxN (default {DEFAULT_SHAPES})")
    p.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    args = p.parse_args(argv)
    try:
        shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",") if s]
        assert all(len(s) == 3 and min(s) > 0 for s in shapes)
    except (ValueError, AssertionError):
        print(f"--shapes must be comma-separated MxKxN with positive integers, got {args.shapes!r}", file=sys.stderr)
        return 2
    import onnxruntime as ort

    only = {s.strip() for s in args.only.split(",") if s.strip()}
    print(f"onnxruntime {ort.__version__}, {args.threads} thread(s), median of {args.runs}; ms (GOP/s)")
    rng = np.random.default_rng(0)
    rows = {}
    for m, k, n in shapes:
        for name, (model, feeds) in variants(m, k, n, rng).items():
            if only and name not in only:
                continue
            seconds = time_model(model, feeds, args.threads, args.runs)
            rows.setdefault(name, {})[(m, k, n)] = seconds
            print(f"  {m}x{k}x{n:<6} {name:<14} {seconds * 1e3:9.2f} ms {2 * m * k * n / seconds / 1e9:8.1f}", flush=True)
    header = ["variant", *(f"{m}x{k}x{n}" for m, k, n in shapes)]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(f"{cells[s] * 1e3:.2f} ms ({2 * s[0] * s[1] * s[2] / cells[s] / 1e9:.0f})"
                                        if s in cells else "" for s in shapes) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
