"""Rules for activations and their gradients: SoftmaxGrad_13, QuickGeluGrad, ReluGrad, TanhGrad, Gelu, GeluGrad."""

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



_SQRT1_2 = 0.7071067811865476  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.3989422804014327  # 1 / sqrt(2 pi)


def _phi(x: str, e: Emitter) -> str:
    """Phi(x) = 0.5 (1 + erf(x / sqrt 2)): the standard normal CDF."""
    erf = e.op("Erf", [e.op("Mul", [x, e.const(_SQRT1_2, np.float32)])])
    return e.op("Mul", [e.const(0.5, np.float32), e.op("Add", [e.const(1.0, np.float32), erf])])


@rule("Gelu")
def gelu(node, e: Emitter) -> None:
    """Gelu(x) = x Phi(x) (erf form; ONNX Runtime fuses BERT's x * 0.5 * (1 + erf(x / sqrt 2)) into it)."""
    x = e.input(0)
    e.op("Mul", [x, _phi(x, e)], out=e.output(0))


@rule("GeluGrad")
def gelu_grad(node, e: Emitter) -> None:
    """GeluGrad(dY, X): dX = dY (Phi(x) + x phi(x)), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)."""
    dy, x = e.input(0), e.input(1)
    density = e.op("Mul", [e.const(_INV_SQRT_2PI, np.float32),
                           e.op("Exp", [e.op("Mul", [e.const(-0.5, np.float32), e.op("Mul", [x, x])])])])
    slope = e.op("Add", [_phi(x, e), e.op("Mul", [x, density])])
    e.op("Mul", [dy, slope], out=e.output(0))
