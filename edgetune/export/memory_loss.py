"""The language-model loss over label positions in chunks, each chunk's backward done at once.

Exported, the loss is ``SoftmaxCrossEntropyLoss(MatMul(h, W^T), y)`` over all N label
positions: (N, V) logits, their (N, V) log-probabilities kept for the backward pass and the
(N, V) gradient all exist around the forward/backward turn, where every stored activation is
alive too (3 x 100 MB for SmolLM2 at 4 x 128 tokens, V = 49,152).

``chunk_loss`` (forward graph, before ``generate_artifacts``) splits the N rows (padded with
``chunks`` ignored rows) into ``chunks`` slices; each slice gets its own MatMul and a ``reduction="sum"`` loss,
and ``loss = sum(chunk losses) / count(labels != ignore_index)``, which is the "mean" of the
original (the sum runs in another order: a relative difference of about 1e-7).
``order_loss_chunks`` (training graph) then makes chunk k+1's forward wait for chunk k's input
gradient, so chunk k's log-probabilities and logit gradient are gone before chunk k+1 starts;
and all chunk matmuls share one dequantized head weight (they run back to back).
"""

from __future__ import annotations

import numpy as np
import onnx

from edgetune.constants import IGNORE_INDEX
from edgetune.export.memory_graph import GraphIndex
from edgetune.export.memory_head import auto_slices, initializer_dims, sliceable, slice_products
from edgetune.onnx_graph import attr, remove_dead_nodes

PREFIX = "memory.loss_chunk"


def chunk_loss(model: onnx.ModelProto, loss: str = "loss", chunks: int = 8) -> int:
    """Rewrite ``loss = SCE(MatMul(h, Wt), y, mean)`` into ``chunks`` chunks; returns chunks made (0: no match).

    ``h`` must be (N, hidden) and ``y`` (N,), as ``training_graph.CausalLMLoss`` exports them.
    """
    if chunks < 2:
        return 0
    g = GraphIndex(model.graph, loss)
    sce_i = g.producer.get(loss)
    if sce_i is None:
        return 0
    sce = g.nodes[sce_i]
    if (sce.op_type != "SoftmaxCrossEntropyLoss" or len(sce.input) != 2 or attr(sce, "reduction", b"mean") != b"mean"
            or any(o for o in sce.output[1:])):
        return 0
    mm_i = g.producer.get(sce.input[0])
    if mm_i is None or g.nodes[mm_i].op_type != "MatMul" or len(g.consumers[sce.input[0]]) != 1:
        return 0
    h, wt = g.nodes[mm_i].input
    y = sce.input[1]
    ignore = int(attr(sce, "ignore_index", IGNORE_INDEX))

    def c(value, name):
        return g.const(np.array(value, np.int64), f"{PREFIX}/{name}")

    # Pad with `chunks` ignored rows (M = N + chunks) and cut at floor(k * M / chunks): every chunk
    # then has at least one row. An empty chunk would crash ORT's SoftmaxCrossEntropyLoss (it
    # divides by the row count), and N < chunks happens (a short batch).
    shape = g.add("Shape", [h], f"{PREFIX}/Shape")  # (2,) int64: [N, hidden]
    n = g.add("Slice", [shape, c([0], "zero"), c([1], "one"), c([0], "zero")], f"{PREFIX}/N")
    m = g.add("Add", [n, c([chunks], "chunks")], f"{PREFIX}/M")
    pad_shape = g.add("Concat", [c([chunks], "chunks"), g.add("Slice", [shape, c([1], "one"), c([2], "two"), c([0], "zero")],
                                                             f"{PREFIX}/Hidden")], f"{PREFIX}/PadShape", axis=0)
    pad = g.add("ConstantOfShape", [pad_shape], f"{PREFIX}/Pad",
                value=onnx.helper.make_tensor("zero", onnx.TensorProto.FLOAT, [1], [0.0]))  # (chunks, hidden)
    h = g.add("Concat", [h, pad], f"{PREFIX}/PaddedH", axis=0)  # (M, hidden)
    y = g.add("Concat", [y, c([ignore] * chunks, "ignored_rows")], f"{PREFIX}/PaddedY", axis=0)  # (M,)
    bounds = [g.add("Div", [g.add("Mul", [m, c([k], f"k{k}")], f"{PREFIX}/Bound{k}Mul"), c([chunks], "chunks")],
                    f"{PREFIX}/Bound{k}") for k in range(chunks + 1)]  # floor(k * M / chunks), (1,) each
    losses = []
    for k in range(chunks):
        tag = f"{PREFIX}{k}"
        begin, end = bounds[k], bounds[k + 1]
        h_k = g.add("Slice", [h, begin, end, c([0], "zero")], f"{tag}/h")  # (rows, hidden), rows >= 1
        y_k = g.add("Slice", [y, begin, end, c([0], "zero")], f"{tag}/y")  # (rows,)
        logits = g.add("MatMul", [h_k, wt], f"{tag}/MatMul")  # (rows, V)
        losses.append(g.add("SoftmaxCrossEntropyLoss", [logits, y_k], f"{tag}/Loss", reduction="sum",
                            ignore_index=ignore))
    total = losses[0]
    for k, part in enumerate(losses[1:], 1):  # ORT has no gradient for Sum; a chain of Adds
        total = g.add("Add", [total, part], f"{PREFIX}/Add{k}")
    counted = g.add("Not", [g.add("Equal", [sce.input[1], c(ignore, "ignore_index")], f"{PREFIX}/Ignored")], f"{PREFIX}/Counted")
    count = g.add("ReduceSum", [g.add("Cast", [counted], f"{PREFIX}/Cast", to=onnx.TensorProto.FLOAT)],
                  f"{PREFIX}/Count", keepdims=0)
    g.nodes.append(onnx.helper.make_node("Div", [total, count], [loss], name=f"{PREFIX}/Mean"))
    g.commit(drop={sce_i, mm_i})
    return chunks


def order_loss_chunks(graph: onnx.GraphProto, report, head_slices: int | None = None) -> None:
    """Chain the chunks (forward k+1 after backward k); the head weight: one shared DequantizeLinear,
    or (``head_slices`` > 1, or None = ``memory_head.auto_slices``) vocabulary slices (memory_head.py)."""
    g = GraphIndex(graph, None)
    k = 0
    while f"{PREFIX}{k + 1}/h_output" in g.producer:
        grad = f"{PREFIX}{k}/h_output_grad"  # d loss / d h_k, ORT's name for it
        nxt = f"{PREFIX}{k + 1}/h_output"
        if grad in g.producer:
            gated = g.after(nxt, grad, f"{PREFIX}{k + 1}")
            for c, j in g.consumers[nxt]:
                if g.nodes[c].name.startswith(f"{PREFIX}{k + 1}/MatMul") and g.nodes[c].name.find("_Grad") < 0:
                    g.nodes[c].input[j] = gated
            report.loss_chunks = k + 2
        k += 1
    _share_head_weight(g, f"{PREFIX}0/h_output", head_slices, report)
    remove_dead_nodes(graph)  # the dropped DQs' scale gates


def _share_head_weight(g: GraphIndex, first_input: str, head_slices: int | None, report) -> None:
    """One dequantized head weight for all chunk matmuls (forward and backward run back to back), or,
    with ``head_slices``, every chunk product on vocabulary slices of it (``memory_head.py``).

    ``DQ -> Reshape(same shape) -> readers``: a DequantizeLinear with several readers would be
    split again by ORT's EnsureUniqueDQForNodeUnit (one copy per reader, all computed up front:
    16 x 113 MB for SmolLM2); behind a Reshape (an alias in ORT, no copy) it has one reader.
    """
    private: dict[str, list[tuple[int, int]]] = {}  # int8 tensor -> chunk readers of its private DQs
    drop: set[int] = set()
    for i, n in enumerate(g.nodes):
        if not n.name.startswith(PREFIX):
            continue
        for j, t in enumerate(n.input):
            p = g.producer.get(t)
            if p is not None and g.nodes[p].op_type == "DequantizeLinear":
                private.setdefault(g.nodes[p].input[0], []).append((i, j))
                drop.add(p)
    for q, readers in private.items():
        dq = g.nodes[g.producer[g.nodes[readers[0][0]].input[readers[0][1]]]]
        dims = initializer_dims(g.graph, q)
        slices = auto_slices(*dims) if head_slices is None and dims and len(dims) == 2 else (head_slices or 0)
        if slices > 1 and dims and sliceable(g, dq, readers):
            scale = dq.input[1]
            while scale in g.producer and g.nodes[g.producer[scale]].op_type == "Slice" \
                    and "/After" in g.nodes[g.producer[scale]].name:  # GraphIndex.after's gate: not a value
                scale = g.nodes[g.producer[scale]].input[0]
            drop |= slice_products(g, dq, scale, readers, dims[0], min(slices, dims[0]))
            report.head_slices = min(slices, dims[0])
            continue
        inputs = list(dq.input)
        inputs[1] = g.after(inputs[1], first_input, f"{dq.name}/shared")  # dequantize when chunk 0 starts
        weight = g.copy(dq, inputs, f"{dq.name}/shared")
        same = g.const(np.array([0, -1], np.int64), "memory.same_2d_shape")  # 0: keep the dim
        weight = g.add("Reshape", [weight, same], f"{dq.name}/shared/Reshape")
        for i, j in readers:
            g.nodes[i].input[j] = weight
    g.commit(drop=drop)

