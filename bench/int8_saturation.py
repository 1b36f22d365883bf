"""How much ONNX Runtime's uint8 x int8 GEMM would clip on an x86 CPU without VNNI, for a ``--compute int8`` bundle.

    python bench/int8_saturation.py BUNDLE [--batch 4 --seq 128] [--match down_proj/MatMul/ ...]

``export --compute int8`` hands each row's integers to ``MatMulIntegerToFloat`` as uint8 a + 128
(zero point 128) times the int8 weight. On CPUs with VNNI (AVX512-VNNI, AVX-VNNI) and on ARM64 the
kernel multiplies exactly. On x86 CPUs with AVX2 (or AVX-512 without VNNI) ONNX Runtime's kernel
uses ``vpmaddubsw``, which adds the products of two adjacent k into a saturating int16: a pair
beyond +-32767 is clipped (ONNX Runtime's quantization docs call it the U8S8 saturation issue).

This script runs one forward-backward of the bundle's portable graph on the bench's fixed random
batch with the inputs of some int8 products as extra outputs, then recomputes those products in
numpy both exactly and with int16-saturated pairs (k = 2i, 2i + 1), and prints, per product, the
share of outputs a clipped pair touches, the per-row quantization's own error (the int8 product
against the same product with fp32 activations) and the error the clipping adds, both relative to
the fp32-activation product (Frobenius norms; the weight is int8 in all three). It measures
nothing on the CPU it runs on; it says what the clipping would cost where it happens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` and the repo's `edgetune`

from bench.data import make_batch  # noqa: E402

DEFAULT_MATCH = ["layers.5/self_attn/q_proj/base/MatMul/", "layers.5/mlp/gate_proj/MatMul/", "layers.5/mlp/down_proj/MatMul/",
                 "layers.5/mlp/gate_proj/MatMul_Grad", "layers.5/mlp/down_proj/MatMul_Grad",
                 "loss_chunk3/MatMul/", "loss_chunk3/MatMul_Grad"]


def probe(folder: Path, match: list[str], batch_size: int, seq: int) -> list[tuple]:
    """(node name, A uint8 (M, K), B int8 (K, N), A fp32 (M, K), row scales (M,)) for every
    MatMulIntegerToFloat whose name contains a ``match``."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgetune.bundle import Bundle
    from edgetune.runtime.batches import graph_inputs
    from edgetune.runtime.ort_checkpoint import read_trainable

    bundle = Bundle.open(folder, verify=False)
    path = bundle.path("portable")
    model = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat" and any(m in n.name for m in match)]
    if not nodes:
        raise SystemExit(f"{path}: no MatMulIntegerToFloat node matches {match} (is it a --compute int8 bundle?)")
    initializers = {t.name for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    quantize = {}  # product -> the per-axis QuantizeLinear (compute_int8._product): its fp32 rows and row scales
    for n in nodes:
        q = producer[producer[n.input[0]].input[0]]  # Reshape (back to A's shape) <- QuantizeLinear
        if q.op_type != "QuantizeLinear":
            raise SystemExit(f"{n.name}: its input is not made by QuantizeLinear; re-export with the current edgetune")
        quantize[n.name] = q
    wanted = list(dict.fromkeys(t for n in nodes for t in (*n.input[:2], *quantize[n.name].input[:2])))
    for n in nodes:
        q = quantize[n.name]
        for t, kind in ((n.input[0], TensorProto.UINT8), (n.input[1], TensorProto.INT8),
                        (q.input[0], TensorProto.FLOAT), (q.input[1], TensorProto.FLOAT)):
            if t not in initializers and t not in {o.name for o in model.graph.output}:
                model.graph.output.append(helper.make_tensor_value_info(t, kind, None))
    probe_path = path.with_name("int8_saturation_probe.onnx")  # beside the weights file it refers to
    onnx.save(model, str(probe_path))
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(probe_path), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in bundle.manifest.inputs]
        batch = make_batch(bundle.manifest.base_model["config"]["vocab_size"], batch_size, seq, 0.25)
        feed = dict(zip(names, graph_inputs(batch, names, [np.dtype(i.dtype) for i in bundle.manifest.inputs])))
        feed.update(read_trainable(bundle.path("checkpoint"), [t.graph_name for t in bundle.manifest.trainable]).params)
        computed = [t for t in wanted if t not in initializers]
        values = dict(zip(computed, session.run(computed, feed)))
    finally:
        probe_path.unlink()
    stored = [t for t in wanted if t in initializers]
    full = onnx.load(str(path)) if stored else None
    values.update({t.name: numpy_helper.to_array(t) for t in (full.graph.initializer if full else []) if t.name in stored})
    return [(n.name, values[n.input[0]].reshape(-1, values[n.input[0]].shape[-1]), values[n.input[1]],
             values[quantize[n.name].input[0]], values[quantize[n.name].input[1]]) for n in nodes]


def clipped_product(a: np.ndarray, b: np.ndarray, zero: int = 128, rows: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(exact (a - zero) @ b, the same with each adjacent-k pair sum clipped to int16, mask of touched outputs)."""
    a, b = a.astype(np.int32), b.astype(np.int32)
    k = a.shape[1] - a.shape[1] % 2
    exact = (a - zero) @ b
    clipped = np.zeros_like(exact)
    touched = np.zeros(exact.shape, bool)
    for r in range(0, a.shape[0], rows):
        pairs = a[r:r + rows, 0:k:2, None] * b[None, 0:k:2] + a[r:r + rows, 1:k:2, None] * b[None, 1:k:2]  # (r, k/2, N)
        kept = np.clip(pairs, -32768, 32767)
        touched[r:r + rows] = (kept != pairs).any(axis=1)
        clipped[r:r + rows] = kept.sum(axis=1) + a[r:r + rows, k:] @ b[k:]  # an odd last k is a pair of its own
    return exact, clipped - zero * b.sum(axis=0), touched


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("bundle", type=Path, help="a bundle exported with --compute int8")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--match", nargs="+", default=DEFAULT_MATCH, help="substrings of the product nodes' names")
    args = p.parse_args(argv)
    print("| product | A (M, K) | B (K, N) | outputs touched | per-row int8 error | clipping adds |")
    print("|---|---|---|---|---|---|")
    for name, a, b, a_fp32, row_scale in probe(args.bundle, args.match, args.batch, args.seq):
        exact, clipped, touched = clipped_product(a, b)
        scale = row_scale.astype(np.float64)[:, None]
        ref = a_fp32.astype(np.float64) @ b.astype(np.float64)  # exact activations, the same int8 weight
        norm = np.linalg.norm(ref)
        print(f"| {name} | {a.shape} | {b.shape} | {touched.mean():.2%} | {np.linalg.norm(exact * scale - ref) / norm:.2e} "
              f"| {np.linalg.norm((clipped - exact) * scale) / norm:.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
