"""Rules for the training build's shape operators: ConcatTraining, SplitTraining, SliceGrad, GatherGrad."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from edgetune.export.portable.emit import Emitter, NotPortable, attr
from edgetune.export.portable.rules import rule

INT64_ZERO = helper.make_tensor("value", TensorProto.INT64, [1], [0])
FLOAT_ZERO = helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0])
BIG = np.iinfo(np.int64).max


@rule("ConcatTraining")
def concat_training(node, e: Emitter) -> None:
    """Concat, plus the optional second output: each input's length along ``axis``, (n_inputs,) int64
    (the gradient builder feeds it to the SplitTraining that takes the concatenation apart again)."""
    axis = attr(node, "axis")
    e.op("Concat", list(node.input), out=e.output(0), axis=axis)
    if e.output(1):
        lengths = [e.op("Gather", [e.op("Shape", [x]), e.const([axis])], axis=0) for x in node.input]
        e.op("Concat", lengths, out=e.output(1), axis=0)


@rule("SplitTraining")
def split_training(node, e: Emitter) -> None:
    """Split with the sizes as an input (opset 13+; SplitTraining requires them): the same
    operator under its standard name."""
    outputs = [name or e.fresh("unused") for name in node.output]
    e.op_n("Split", [e.input(0), e.input(1)], outputs, axis=attr(node, "axis", 0))


@rule("SliceGrad")
def slice_grad(node, e: Emitter) -> None:
    """dX = zeros(shape) with dY written where ``Slice(X, starts, ends, axes, steps)`` read.

    With unit steps the read region is one box, so dX = Pad(dY): before an axis the clamped start,
    after it what remains (dim - start - len(dY)). Starts follow Slice's rules: negative counts
    from the end, then clamped to [0, dim]. Axes may be negative; absent axes are 0..k-1.
    """
    dy, shape, starts, ends, axes, steps = (e.input(i) for i in range(6))
    if steps:
        value = e.constant(steps)
        if value is None or not np.all(value == 1):
            raise NotPortable("SliceGrad with steps other than 1 (or not constant)")
    rank = e.op("Size", [shape])  # scalar
    starts = e.op("Cast", [starts], to=TensorProto.INT64)
    if axes:
        axes = e.op("Cast", [axes], to=TensorProto.INT64)
    else:
        axes = e.op("Range", [e.const(0), e.op("Size", [starts]), e.const(1)])
    axes = _wrap(e, axes, rank)  # (k,) in [0, rank)
    dims = e.op("Gather", [shape, axes], axis=0)  # (k,)
    begin = e.op("Max", [e.op("Min", [_wrap(e, starts, dims), dims]), e.const(0)])
    lengths = e.op("Gather", [e.op("Shape", [dy]), axes], axis=0)
    end = e.op("Sub", [e.op("Sub", [dims, begin]), lengths])
    zeros = e.op("ConstantOfShape", [e.op("Mul", [e.op("Shape", [shape]), e.const([2])])], value=INT64_ZERO)
    where = e.op("Concat", [axes, e.op("Add", [axes, rank])], axis=0)
    pads = e.op("ScatterElements", [zeros, where, e.op("Concat", [begin, end], axis=0)], axis=0)
    e.op("Pad", [dy, pads], out=e.output(0), mode="constant")


@rule("GatherGrad")
def gather_grad(node, e: Emitter) -> None:
    """dX = zeros(shape), then dY's rows added at ``indices`` (repeated indices add up): ScatterND
    with reduction "add" (opset 16+). Axis 0 only (embedding lookups, row selections)."""
    if attr(node, "axis", 0) != 0:
        raise NotPortable(f"GatherGrad along axis {attr(node, 'axis')} (only axis 0 is rewritten)")
    shape, indices, dy = e.input(0), e.input(1), e.input(2)
    flat = e.op("Reshape", [e.op("Cast", [indices], to=TensorProto.INT64), e.const([-1])])  # (N,)
    dim0 = e.op("Gather", [shape, e.const([0])], axis=0)  # (1,)
    flat = _wrap(e, flat, dim0)
    rows = e.op("Concat", [e.op("Shape", [flat]), e.op("Slice", [shape, e.const([1]), e.const([BIG])])], axis=0)
    updates = e.op("Reshape", [dy, rows])  # (N, *shape[1:])
    zeros = e.op("ConstantOfShape", [shape], value=FLOAT_ZERO)
    e.op("ScatterND", [zeros, e.op("Unsqueeze", [flat, e.const([-1])]), updates], out=e.output(0), reduction="add")


def _wrap(e: Emitter, index: str, size: str) -> str:
    """index < 0 -> index + size (int64, broadcasting)."""
    return e.op("Where", [e.op("Less", [index, e.const(0)]), e.op("Add", [index, size]), index])
