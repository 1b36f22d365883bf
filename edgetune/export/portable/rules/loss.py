"""Rules for the cross-entropy loss: SoftmaxCrossEntropyLoss (a standard operator, but its CPU
kernel lives in the training build only) and its gradient SoftmaxCrossEntropyLossGrad.

Both follow ONNX Runtime's kernels exactly, including where they differ from a plain formula:
ignored samples (label == ignore_index) contribute 0, and reduction "mean" divides by the sum of
the kept samples' weights (their count without weights) only when that sum is not 0, so a chunk
whose labels are all ignored gives loss 0 and gradient 0, not NaN.
Shapes: scores / log_prob (N, C) or (N, C, d1..dk); labels (N) or (N, d1..dk); weight (C,).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from edgetune.export.portable.emit import Emitter, NotPortable, attr
from edgetune.export.portable.rules import rule

REDUCTIONS = ("mean", "sum", "none")


@rule("SoftmaxCrossEntropyLoss", domain="")
def softmax_cross_entropy_loss(node, e: Emitter) -> None:
    scores, weight = e.input(0), e.input(2)
    reduction = _reduction(node)
    log_prob = _log_softmax(e, scores, out=e.output(1) or None)
    label, keep = _labels(node, e, e.input(1), ignore_input=e.input(3))
    picked = e.op("GatherElements", [log_prob, e.op("Unsqueeze", [label, e.const([1])])], axis=1)
    loss = e.op("Neg", [e.op("Squeeze", [picked, e.const([1])])])  # (N, d..)
    w = e.op("Gather", [weight, label], axis=0) if weight else None  # weight of each sample's class
    if w:
        loss = e.op("Mul", [loss, w])
    loss = e.op("Where", [keep, loss, e.const(0.0, np.float32)])
    if reduction == "none":
        e.op("Identity", [loss], out=e.output(0))
        return
    total = e.op("ReduceSum", [loss], keepdims=0)  # no axes: all of them
    if reduction == "sum":
        e.op("Identity", [total], out=e.output(0))
        return
    e.op("Div", [total, _denominator(e, keep, w)], out=e.output(0))


@rule("SoftmaxCrossEntropyLossGrad")
def softmax_cross_entropy_loss_grad(node, e: Emitter) -> None:
    """d_logits = (exp(log_prob) - onehot(label)) * w * dY' per sample, 0 for ignored samples;
    dY' = dY (none: per sample; sum: scalar) or dY / denominator (mean)."""
    dy, log_prob, weight = e.input(0), e.input(1), e.input(3)
    reduction = _reduction(node)
    label, keep = _labels(node, e, e.input(2), ignore_input=e.input(4))
    depth = e.op("Gather", [e.op("Shape", [log_prob]), e.const([1])], axis=0)  # (1,) = C
    onehot = e.op("OneHot", [label, depth, e.const([0.0, 1.0], np.float32)], axis=1)  # (N, C, d..)
    diff = e.op("Sub", [e.op("Exp", [log_prob]), onehot])
    w = e.op("Gather", [weight, label], axis=0) if weight else None
    coef = dy  # (N, d..) for "none", a scalar otherwise
    if reduction == "mean":
        coef = e.op("Div", [dy, _denominator(e, keep, w)])
    if w:
        coef = e.op("Mul", [coef, w])
    coef = e.op("Where", [keep, coef, e.const(0.0, np.float32)])  # (N, d..); a scalar dY broadcasts
    e.op("Mul", [diff, e.op("Unsqueeze", [coef, e.const([1])])], out=e.output(0))


def _log_softmax(e: Emitter, scores: str, out: str | None) -> str:
    """log_prob over axis 1 in the kernel's own steps, (x - max) - log(sum(exp(x - max))), with
    the same elementwise Exp and Log: LogSoftmax rounds differently, and through a deep network
    those last-bit differences grew to 2e-5 relative in the first layers' gradients."""
    shifted = e.op("Sub", [scores, e.reduce("ReduceMax", scores, [1])])
    total = e.op("ReduceSum", [e.op("Exp", [shifted]), e.const([1])], keepdims=1)
    return e.op("Sub", [shifted, e.op("Log", [total])], out=out)


def _reduction(node) -> str:
    reduction = attr(node, "reduction", "mean")
    if reduction not in REDUCTIONS:
        raise NotPortable(f"{node.op_type} with reduction {reduction!r}")
    return reduction


def _labels(node, e: Emitter, label: str, ignore_input: str) -> tuple[str, str]:
    """(labels as int64 with ignored ones replaced by class 0 so they index safely, bool mask of
    the kept samples)."""
    label = e.op("Cast", [label], to=TensorProto.INT64)
    if ignore_input:  # the index as a scalar tensor input overrides the attribute (as in the kernel)
        ignore = e.op("Cast", [ignore_input], to=TensorProto.INT64)
    else:  # absent, the training build's kernels ignore -1 (their schema's default)
        ignore = e.const(int(attr(node, "ignore_index", -1)))
    ignored = e.op("Equal", [label, ignore])
    return e.op("Where", [ignored, e.const(0), label]), e.op("Not", [ignored])


def _denominator(e: Emitter, keep: str, w: str | None) -> str:
    """Sum of the kept samples' weights (or their count); 1 where that is 0."""
    if w:
        kept = e.op("Where", [keep, w, e.const(0.0, np.float32)])
    else:
        kept = e.op("Cast", [keep], to=TensorProto.FLOAT)
    total = e.op("ReduceSum", [kept], keepdims=0)
    return e.op("Where", [e.op("Equal", [total, e.const(0.0, np.float32)]), e.const(1.0, np.float32), total])
