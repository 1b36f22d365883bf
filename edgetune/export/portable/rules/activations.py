"""Rules for activation gradients: SoftmaxGrad_13, QuickGeluGrad, ReluGrad, TanhGrad."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from edgetune.export.portable.emit import Emitter, attr
from edgetune.export.portable.rules import rule


@rule("SoftmaxGrad_13")
def softmax_grad(node, e: Emitter) -> None:
    """Y = Softmax(X, axis) (opset 13: one axis): dX = Y * (dY - sum(dY * Y, axis))."""
    dy, y = e.input(0), e.input(1)
    axis = attr(node, "axis", -1)
    total = e.op("ReduceSum", [e.op("Mul", [dy, y]), e.const([axis])], keepdims=1)
    e.op("Mul", [y, e.op("Sub", [dy, total])], out=e.output(0))


@rule("QuickGeluGrad")
def quick_gelu_grad(node, e: Emitter) -> None:
    """QuickGelu(x) = x * sigmoid(a x) (a = 1: SiLU): dX = dY * s * (1 + a x (1 - s)), s = sigmoid(a x)."""
    dy, x = e.input(0), e.input(1)
    alpha = float(attr(node, "alpha", 1.702))
    ax = e.op("Mul", [x, e.const(alpha, np.float32)])
    s = e.op("Sigmoid", [ax])
    slope = e.op("Add", [e.const(1.0, np.float32), e.op("Mul", [ax, e.op("Sub", [e.const(1.0, np.float32), s])])])
    e.op("Mul", [e.op("Mul", [dy, s]), slope], out=e.output(0))


@rule("ReluGrad")
def relu_grad(node, e: Emitter) -> None:
    """ReluGrad(dY, Y) (Y = Relu(X); e.g. a bottleneck adapter): dX = dY where Y > 0, else 0."""
    dy, y = e.input(0), e.input(1)
    positive = e.op("Cast", [e.op("Greater", [y, e.const(0.0, np.float32)])], to=TensorProto.FLOAT)
    e.op("Mul", [dy, positive], out=e.output(0))


@rule("TanhGrad")
def tanh_grad(node, e: Emitter) -> None:
    """TanhGrad(dY, Y) (Y = Tanh(X); e.g. prefix tuning's reparameterisation MLP): dX = dY * (1 - Y^2)."""
    dy, y = e.input(0), e.input(1)
    e.op("Mul", [dy, e.op("Sub", [e.const(1.0, np.float32), e.op("Mul", [y, y])])], out=e.output(0))

