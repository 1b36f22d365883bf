"""Graph rewrites that cut the training step's peak memory without changing its numbers.

Applied to the ONNX Runtime training artifacts after ``generate_artifacts`` (the gradient graph
must exist to tell forward from backward uses):

1. ``private_dequantize`` (training and eval model): every user of an int8 frozen weight gets its
   own ``DequantizeLinear``, run just before it, and no ``Transpose`` copy of it. Exported, each
   weight W (out, in) is ``DQ -> Transpose -> MatMul`` and the transposed fp32 copy is also read
   by the backward ``dX = dY @ W``: all 135 M fp32 weights stayed alive from the forward to the
   backward pass (0.54 GB for SmolLM2-135M). Now the forward reads ``FusedMatMul(x, DQ(W),
   transB=1)`` and the backward ``MatMul(dY, DQ'(W))``; each fp32 copy lives for one matmul.
   No ``Transpose`` follows a DQ any more, so ORT's QDQ propagation has nothing to rewrite
   (with it, it inserted a single-threaded QuantizeLinear after every weight Transpose).
2. ``recompute_segments`` (training model): activation checkpointing per residual block. With
   policy ``full`` only the residual-stream tensors between blocks are kept from the forward
   pass (``cheap`` also keeps the frozen projections' outputs); just before a block's backward
   its forward is recomputed from the stored tensors (see ``memory_recompute.py``).
3. ``order_loss_chunks`` (training model), when the forward graph went through
   ``memory_loss.chunk_loss`` before ``generate_artifacts``: the LM-head chunks run one after
   another, forward and backward, on one shared dequantized head weight, or, for heads too large
   for that (``memory_head.py``), on vocabulary slices dequantized one at a time.

All keep every operation and operand as it was, so losses, gradients and updated adapters are
what the plain graph gives (tests/test_memory.py compares them). The eval model gets rewrite 1
only. The saving is real only if the session frees each value at its last use: the runtime turns
off ORT's static buffer sharing for training sessions (``runtime/session_options.training_options``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

from edgetune.export.memory_graph import GraphIndex
from edgetune.export.memory_loss import PREFIX, order_loss_chunks
from edgetune.onnx_graph import attr, set_attr

RECOMPUTE_POLICIES = ("full", "cheap", "mlp", "none")
MS_DOMAIN = "com.microsoft"


@dataclass
class MemoryReport:
    """What the rewrites changed (the exporter may log it)."""

    private_dequantize: int = 0  # DequantizeLinear nodes created (one per weight use)
    transposes_removed: int = 0
    recomputed_segments: int = 0
    recomputed_nodes: int = 0
    loss_chunks: int = 0  # chunks of the loss head chained forward/backward
    head_slices: int = 0  # vocabulary slices of the LM head's products (0: one shared fp32 copy; memory_head.py)
    skipped: list[str] = field(default_factory=list)  # segments left alone, with the reason

    def to_dict(self, recompute: str) -> dict:
        """What the manifest records (``producer.memory``)."""
        return {"recompute": recompute, "recomputed_segments": self.recomputed_segments,
                "recomputed_nodes": self.recomputed_nodes, "private_dequantize": self.private_dequantize,
                "transposes_removed": self.transposes_removed, "loss_chunks": self.loss_chunks,
                "head_slices": self.head_slices, "skipped": self.skipped}


def optimize_artifacts(folder: Path | str, loss: str = "loss", recompute: str = "cheap",
                       head_slices: int | None = None) -> MemoryReport:
    """Rewrite ``training_model.onnx`` and ``eval_model.onnx`` in ``folder`` in place."""
    folder = Path(folder)
    report = MemoryReport()
    training = onnx.load(str(folder / "training_model.onnx"))
    optimize_training_model(training, loss=loss, recompute=recompute, report=report, head_slices=head_slices)
    onnx.save(training, str(folder / "training_model.onnx"))
    evaluation = onnx.load(str(folder / "eval_model.onnx"))
    _ensure_ms_domain(evaluation)
    private_dequantize(evaluation.graph, loss=None)
    onnx.save(evaluation, str(folder / "eval_model.onnx"))
    return report


def optimize_training_model(model: onnx.ModelProto, loss: str = "loss", recompute: str = "cheap",
                            report: MemoryReport | None = None, head_slices: int | None = None) -> MemoryReport:
    """Both rewrites on a training model (a graph holding forward and backward nodes)."""
    from edgetune.export.memory_recompute import recompute_segments

    if recompute not in RECOMPUTE_POLICIES:
        raise ValueError(f"`recompute` must be one of {', '.join(RECOMPUTE_POLICIES)}, got {recompute!r}.")
    report = report or MemoryReport()
    _ensure_ms_domain(model)
    if recompute != "none":
        recompute_segments(model.graph, loss, recompute, report)  # clones read Transpose(DQ(W)) too:
    private_dequantize(model.graph, loss, report)  # ... so this runs second and covers them
    if any(n.name.startswith(PREFIX) for n in model.graph.node):  # the forward graph went through chunk_loss
        order_loss_chunks(model.graph, report, head_slices)  # after private_dequantize: merges the chunks' DQs
    return report


def private_dequantize(graph: onnx.GraphProto, loss: str | None, report: MemoryReport | None = None) -> MemoryReport:
    """Read frozen weights without Transpose copies; give each use of a weight DQ its own DQ.

    Rewritten uses (W (out, in): an int8 ``DQ(W)`` or a frozen fp32 parameter; ``Wt =
    Transpose(W)`` (in, out)):
      MatMul(A, Wt)                    -> FusedMatMul(A, W, transB=1)
      FusedMatMul(A, Wt, transB=t)     -> FusedMatMul(A, W, transB=1-t)  (MatMul when plain)
      Gemm(A, Wt, transB=t)            -> Gemm(A, W, transB=1-t)
    Any other reader of Wt keeps a Transpose. For int8 weights each use reads a private DQ that
    waits for the use's first input (``GraphIndex.after``), so it runs right before the use.
    """
    report = report or MemoryReport()
    g = GraphIndex(graph, loss)
    outputs = {o.name for o in graph.output}
    weight_dq = {i for i, n in enumerate(g.nodes) if n.op_type == "DequantizeLinear" and n.output[0] not in outputs
                 and all(g.is_graph_value(t) for t in n.input if t)}  # stored weights, not activations
    drop: set[int] = set()
    for t in range(len(g.nodes)):  # not the nodes this loop appends
        node = g.nodes[t]
        src = node.input[0] if node.input else ""
        if node.op_type != "Transpose" or attr(node, "perm") != [1, 0] or node.output[0] in outputs:
            continue
        if g.producer.get(src) in weight_dq:
            dq = g.nodes[g.producer[src]]
        elif g.is_graph_value(src) and loss is not None and f"{src}_grad" not in g.producer:
            dq = None  # a frozen fp32 parameter: read it directly
        else:
            continue  # an activation, or a trainable tensor (its Transpose has a gradient)
        kept = False
        for c, j in list(g.consumers[node.output[0]]):
            kept |= not _read_untransposed(g, dq, src, c, j, report)
        if not kept:
            drop.add(t)
            report.transposes_removed += 1
    for d in weight_dq:  # every remaining use of a shared DQ output gets its own DQ
        dq = g.nodes[d]
        for c, j in list(g.consumers[dq.output[0]]):
            if c not in drop:
                g.nodes[c].input[j] = _private_dq(g, dq, _first_other_input(g.nodes[c], j), report)
        drop.add(d)
    g.commit(drop)
    return report


def _read_untransposed(g: GraphIndex, dq: onnx.NodeProto | None, w: str, c: int, slot: int,
                       report: MemoryReport) -> bool:
    """Make node ``c``, which reads Transpose(W) at input ``slot``, read W; False if it cannot."""
    node = g.nodes[c]
    other = _first_other_input(node, slot)
    flip = slot == 1 and (
        node.op_type == "MatMul"
        or (node.op_type == "FusedMatMul" and not attr(node, "transBatchB", 0))
        or (node.op_type == "Gemm"))
    if not flip:
        if dq is None:
            return False  # keeps reading the Transpose of the fp32 parameter
        # some other reader of a transposed int8 weight: private DQ -> Transpose
        node.input[slot] = g.add("Transpose", [_private_dq(g, dq, other, report)], f"{dq.name}/private/Transpose", perm=[1, 0])
        return True
    if dq is not None:
        w = _private_dq(g, dq, other, report)
    if node.op_type == "MatMul":
        # (.., in) @ (in, out) == FusedMatMul((.., in), (out, in), transB=1): same GEMM, no copy
        node.op_type, node.domain = "FusedMatMul", MS_DOMAIN
        set_attr(node, "transB", 1)
    else:
        trans_b = 1 - int(attr(node, "transB", 0))
        set_attr(node, "transB", trans_b)
        plain = (node.op_type == "FusedMatMul" and trans_b == 0 and not attr(node, "transA", 0)
                 and not attr(node, "transBatchA", 0) and float(attr(node, "alpha", 1.0)) == 1.0)
        if plain:  # the backward dX = dY @ W: a standard MatMul
            node.op_type, node.domain = "MatMul", ""
            del node.attribute[:]
    node.input[slot] = w
    return True


def _private_dq(g: GraphIndex, dq: onnx.NodeProto, dependency: str | None, report: MemoryReport) -> str:
    """A copy of ``dq`` that runs only once ``dependency`` exists (its scale is gated on it)."""
    inputs = list(dq.input)
    if dependency:
        inputs[1] = g.after(inputs[1], dependency, f"{dq.name}/private")
    report.private_dequantize += 1
    return g.copy(dq, inputs, f"{dq.name}/private")


def _first_other_input(node: onnx.NodeProto, slot: int) -> str | None:
    """The consumer's activation operand: the tensor that decides when the weight is needed."""
    for j, name in enumerate(node.input):
        if j != slot and name:
            return name
    return None


def _ensure_ms_domain(model: onnx.ModelProto) -> None:
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
