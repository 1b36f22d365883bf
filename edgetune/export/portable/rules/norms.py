"""Rules for SimplifiedLayerNormalizationGrad (the backward of RMSNorm) and LayerNormalizationGrad."""

from __future__ import annotations

from edgetune.export.portable.emit import Emitter, attr
from edgetune.export.portable.rules import rule


@rule("SimplifiedLayerNormalizationGrad")
def simplified_layer_norm_grad(node, e: Emitter) -> None:
    """y = x * r * g with r = 1 / sqrt(mean(x^2) + eps) over the axes from ``axis`` on (r is the
    forward's saved ``inv_std_var``, so epsilon is not needed again). In 2-D, (M, N) rows:
      x^ = x r;  dX = r (dY g - x^ mean(dY g x^));  dScale = sum over rows of dY x^.
    """
    dy, x, scale, inv_std = (e.input(i) for i in range(4))
    axis = attr(node, "axis", -1)
    x2 = e.op("Flatten", [x], axis=axis)  # (M, N)
    dy2 = e.op("Flatten", [dy], axis=axis)
    r = e.op("Flatten", [inv_std], axis=axis)  # (M, 1)
    x_hat = e.op("Mul", [x2, r])
    dyg = e.op("Mul", [dy2, e.op("Reshape", [scale, e.const([1, -1])])])  # (M, N)
    mean = e.reduce("ReduceMean", e.op("Mul", [dyg, x_hat]), [1])  # (M, 1)
    dx2 = e.op("Mul", [r, e.op("Sub", [dyg, e.op("Mul", [x_hat, mean])])])
    e.op("Reshape", [dx2, e.op("Shape", [x])], out=e.output(0))
    # dScale: computed, and dropped with the rest of the dead nodes when nothing reads it (a frozen scale)
    d_scale = e.op("ReduceSum", [e.op("Mul", [dy2, x_hat]), e.const([0])], keepdims=0)  # (N,)
    e.op("Reshape", [d_scale, e.op("Shape", [scale])], out=e.output(1))


@rule("LayerNormalizationGrad")
def layer_norm_grad(node, e: Emitter) -> None:
    """The backward of LayerNormalization (BERT-family encoders): y = (x - mu) r g + b, with mu and
    r = 1 / sqrt(var + eps) the forward's saved ``mean`` and ``inv_std_dev`` over the axes from
    ``axis`` on. In 2-D, (M, N) rows, with x^ = (x - mu) r and dyg = dY g:
      dX = r (dyg - mean(dyg) - x^ mean(dyg x^));  dScale = sum over rows of dY x^;  dBias = sum of dY.
    """
    dy, x, scale, mean, inv_std = (e.input(i) for i in range(5))
    axis = attr(node, "axis", -1)
    x2 = e.op("Flatten", [x], axis=axis)  # (M, N)
    dy2 = e.op("Flatten", [dy], axis=axis)
    mu = e.op("Flatten", [mean], axis=axis)  # (M, 1)
    r = e.op("Flatten", [inv_std], axis=axis)  # (M, 1)
    x_hat = e.op("Mul", [e.op("Sub", [x2, mu]), r])
    dyg = e.op("Mul", [dy2, e.op("Reshape", [scale, e.const([1, -1])])])  # (M, N)
    mean_dyg = e.reduce("ReduceMean", dyg, [1])  # (M, 1)
    mean_dyg_x = e.reduce("ReduceMean", e.op("Mul", [dyg, x_hat]), [1])  # (M, 1)
    dx2 = e.op("Mul", [r, e.op("Sub", [e.op("Sub", [dyg, mean_dyg]), e.op("Mul", [x_hat, mean_dyg_x])])])
    e.op("Reshape", [dx2, e.op("Shape", [x])], out=e.output(0))
    # dScale and dBias: dropped with the rest of the dead nodes when nothing reads them (frozen)
    d_scale = e.op("ReduceSum", [e.op("Mul", [dy2, x_hat]), e.const([0])], keepdims=0)  # (N,)
    e.op("Reshape", [d_scale, e.op("Shape", [scale])], out=e.output(1))
    d_bias = e.op("ReduceSum", [dy2, e.const([0])], keepdims=0)  # (N,)
    e.op("Reshape", [d_bias, e.op("Shape", [scale])], out=e.output(2))
