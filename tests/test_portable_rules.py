"""Each rewrite rule (edgetune/export/portable/rules/) against the training build's own operator.

A case is one node of the training operator with random inputs. The training build of
onnxruntime (this environment's) runs it as is; the same node rewritten by its rule runs as
standard ONNX in the same build (with graph optimizations off, so the operators themselves are
compared) and must give the same outputs. Rewritten graphs may use only operators the stock
build has (``stock_ops``).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from edgetune.export.portable.rewrite import make_stock
from edgetune.export.portable.rules import RULES
from edgetune.export.portable.stock_ops import is_stock

RNG = np.random.default_rng(0)
I64_MAX = np.iinfo(np.int64).max


def _f(*shape, scale=1.0):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def _log_softmax(x, axis=1):
    x = x - x.max(axis=axis, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=axis, keepdims=True))).astype(np.float32)


def _model(op, inputs, outputs, consts=None, domain="com.microsoft", **attrs):
    """One ``op`` node; ``inputs`` name -> array fed at run time, ``consts`` name -> array stored
    as initializers (as the exported graphs hold them); "" in ``outputs`` is an absent output."""
    consts = consts or {}
    names = [n for n in (*inputs, *consts)]
    order = attrs.pop("input_order", names)
    node = helper.make_node(op, order, outputs, name=f"{op}_under_test", domain=domain, **attrs)
    graph = helper.make_graph(
        [node], "case",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), None) for k, v in inputs.items()],
        [onnx.ValueInfoProto(name=o) for o in outputs if o],  # types as the operator infers them
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


def _run(model, feeds):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _slice_case(shape, starts, ends, axes=None, steps=None):
    """SliceGrad inputs for Slice(X, starts, ends, axes, steps); dY has the slice's shape."""
    x = np.zeros(shape, np.float32)
    index = [slice(None)] * len(shape)
    for k, (s, e) in enumerate(zip(starts, ends)):
        axis = axes[k] if axes is not None else k
        index[axis] = slice(s, e, steps[k] if steps is not None else None)
    dy = _f(*x[tuple(index)].shape)
    consts = {"starts": np.array(starts), "ends": np.array(ends)}
    if axes is not None:
        consts["axes"] = np.array(axes)
    if steps is not None:
        consts["steps"] = np.array(steps)
    return {"dy": dy, "shape": np.array(shape, np.int64)}, consts


def _sce_grad_case(n, c, reduction, ignored=(), extra=(), weight=False):
    lp = _log_softmax(_f(n, c, *extra, scale=3.0))
    label = RNG.integers(0, c, size=(n, *extra)).astype(np.int64)
    label.reshape(-1)[list(ignored)] = -100
    dy = _f(n, *extra) if reduction == "none" else np.array(RNG.uniform(0.5, 2.0), np.float32)
    inputs = {"dy": dy, "log_prob": lp, "label": label}
    if weight:
        inputs["weight"] = RNG.uniform(0.1, 2.0, size=c).astype(np.float32)
    return inputs


def _sce_case(n, c, ignored=(), extra=(), weight=False):
    label = RNG.integers(0, c, size=(n, *extra)).astype(np.int64)
    label.reshape(-1)[list(ignored)] = -100
    inputs = {"scores": _f(n, c, *extra, scale=3.0), "label": label}
    if weight:
        inputs["weight"] = RNG.uniform(0.1, 2.0, size=c).astype(np.float32)
    return inputs


def _gather_case(shape, indices):
    """GatherGrad inputs for Gather(X (shape), indices, axis=0): dY is (*indices.shape, *shape[1:])."""
    indices = np.asarray(indices, np.int64)
    return {"shape": np.array(shape, np.int64), "indices": indices, "dy": _f(*indices.shape, *shape[1:])}, None


def _softmax_case(shape, axis):
    return {"dy": _f(*shape), "y": np.exp(_log_softmax(_f(*shape), axis))}


def _norm_case(shape, axis):
    x = _f(*shape, scale=2.0)
    axes = tuple(range(axis % len(shape), len(shape)))
    inv_std = (1 / np.sqrt((x ** 2).mean(axis=axes, keepdims=True) + 1e-6)).astype(np.float32)
    return {"dy": _f(*shape), "x": x, "scale": _f(*shape[axis % len(shape):]), "inv_std": inv_std}


def _layer_norm_case(shape, axis, eps=1e-12):
    """LayerNormalizationGrad inputs: the forward's mean and inv_std_dev over the axes from ``axis`` on."""
    x = _f(*shape, scale=2.0) + 0.5
    axes = tuple(range(axis % len(shape), len(shape)))
    mean = x.mean(axis=axes, keepdims=True).astype(np.float32)
    inv_std = (1 / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + eps)).astype(np.float32)
    return {"dy": _f(*shape), "x": x, "scale": _f(*shape[axis % len(shape):]), "mean": mean, "inv_std": inv_std}


SCE, GRAD = "SoftmaxCrossEntropyLoss", "SoftmaxCrossEntropyLossGrad"
LN = "LayerNormalizationGrad"
MEAN, SUM, NONE = ({"reduction": r, "ignore_index": -100} for r in ("mean", "sum", "none"))
RMS = "SimplifiedLayerNormalizationGrad"
CASES = {
    # ConcatTraining: lengths output; an empty input; negative axis
    "concat-lengths": ("ConcatTraining", {"a": _f(2, 3), "b": _f(2, 0), "c": _f(2, 5)}, None, ["y", "lengths"], {"axis": 1}),
    "concat-neg-axis": ("ConcatTraining", {"a": _f(2, 3, 4), "b": _f(2, 3, 1)}, None, ["y", "lengths"], {"axis": -1}),
    "concat-one-output": ("ConcatTraining", {"a": _f(4, 3), "b": _f(1, 3)}, None, ["y"], {"axis": 0}),
    # SplitTraining: sizes with an empty part, constant or fed
    "split-sizes": ("SplitTraining", {"x": _f(4, 7)}, {"split": np.array([2, 0, 5])}, ["p", "q", "r"], {"axis": 1}),
    "split-runtime-sizes": ("SplitTraining", {"x": _f(6, 2), "split": np.array([1, 5])}, None, ["p", "q"], {"axis": 0}),
    # SliceGrad: Slice's rules for negative / out-of-range starts and ends, absent and negative axes
    "slice-basic": ("SliceGrad", *_slice_case((4, 6), [1, 2], [3, 5]), ["dx"], {}),
    "slice-negative": ("SliceGrad", *_slice_case((3, 5, 4), [-3], [-1], axes=[1], steps=[1]), ["dx"], {}),
    "slice-neg-axis-clamped": ("SliceGrad", *_slice_case((3, 5, 4), [-100, 2], [I64_MAX, 99], axes=[-1, 0]), ["dx"], {}),
    "slice-empty": ("SliceGrad", *_slice_case((3, 5), [4], [2], axes=[1]), ["dx"], {}),
    "slice-causal-shift": ("SliceGrad", *_slice_case((2, 7, 8), [0], [-1], axes=[1]), ["dx"], {}),
    # GatherGrad: repeated indices add up; 2-D indices; negative indices; no indices
    "gather-repeated": ("GatherGrad", *_gather_case([6, 3], [4, 1, 4, 0, 4]), ["dx"], {"axis": 0}),
    "gather-2d": ("GatherGrad", *_gather_case([5, 2, 3], [[0, 4], [4, 2]]), ["dx"], {}),
    "gather-negative": ("GatherGrad", *_gather_case([4, 2], [-1, 1, -4]), ["dx"], {"axis": 0}),
    "gather-none": ("GatherGrad", *_gather_case([4, 2], np.zeros(0, np.int64)), ["dx"], {"axis": 0}),
    # SoftmaxGrad_13: last axis (also the default), a middle axis
    "softmax-last": ("SoftmaxGrad_13", _softmax_case((2, 3, 5), -1), None, ["dx"], {"axis": -1}),
    "softmax-default": ("SoftmaxGrad_13", _softmax_case((4, 5), -1), None, ["dx"], {}),
    "softmax-axis1": ("SoftmaxGrad_13", _softmax_case((2, 3, 5), 1), None, ["dx"], {"axis": 1}),
    # QuickGeluGrad: SiLU (alpha 1) and the default alpha, over a wide range of x
    "quickgelu-silu": ("QuickGeluGrad", {"dy": _f(3, 8), "x": _f(3, 8, scale=6.0)}, None, ["dx"], {"alpha": 1.0}),
    "quickgelu-default": ("QuickGeluGrad", {"dy": _f(3, 8), "x": _f(3, 8, scale=6.0)}, None, ["dx"], {}),
    # ReluGrad / TanhGrad (dY, Y): bottleneck adapters' relu, prefix tuning's reparameterisation MLP
    "relu-grad": ("ReluGrad", {"dy": _f(3, 8), "y": np.maximum(_f(3, 8, scale=2.0), 0)}, None, ["dx"], {}),
    "tanh-grad": ("TanhGrad", {"dy": _f(3, 8), "y": np.tanh(_f(3, 8, scale=2.0))}, None, ["dx"], {}),
    # SimplifiedLayerNormalizationGrad: last axis; two normalized axes (the schema requires both outputs)
    "rmsnorm-last": (RMS, _norm_case((2, 3, 16), -1), None, ["dx", "dscale"], {"axis": -1, "epsilon": 1e-6}),
    "rmsnorm-two-axes": (RMS, _norm_case((2, 3, 8), 1), None, ["dx", "dscale"], {"axis": 1}),
    # LayerNormalizationGrad (BERT): last axis (the schema requires all three outputs); two normalized axes
    "layernorm-last": (LN, _layer_norm_case((2, 3, 16), -1), None, ["dx", "dscale", "dbias"], {"axis": -1, "epsilon": 1e-12}),
    "layernorm-two-axes": (LN, _layer_norm_case((2, 3, 8), 1), None, ["dx", "dscale", "dbias"], {"axis": 1}),
    # Gelu (erf form, as ORT fuses BERT's activation) and its gradient, over a wide range of x
    "gelu": ("Gelu", {"x": _f(3, 8, scale=4.0)}, None, ["y"], {}),
    "gelu-grad": ("GeluGrad", {"dy": _f(3, 8), "x": _f(3, 8, scale=4.0)}, None, ["dx"], {}),
    # SoftmaxCrossEntropyLossGrad: each reduction, ignored labels, all ignored, weights, (N, C, d) input
    "sce-grad-mean-ignored": (GRAD, _sce_grad_case(6, 7, "mean", ignored=[0, 3]), None, ["dx"], MEAN),
    "sce-grad-sum-ignored": (GRAD, _sce_grad_case(6, 7, "sum", ignored=[5]), None, ["dx"], SUM),
    "sce-grad-none": (GRAD, _sce_grad_case(6, 7, "none", ignored=[1]), None, ["dx"], NONE),
    "sce-grad-all-ignored": (GRAD, _sce_grad_case(3, 7, "mean", ignored=[0, 1, 2]), None, ["dx"], MEAN),
    "sce-grad-sum-all-ignored": (GRAD, _sce_grad_case(3, 7, "sum", ignored=[0, 1, 2]), None, ["dx"], SUM),
    "sce-grad-weighted-mean": (GRAD, _sce_grad_case(6, 7, "mean", ignored=[2], weight=True), None, ["dx"], MEAN),
    "sce-grad-weighted-none": (GRAD, _sce_grad_case(6, 7, "none", weight=True), None, ["dx"], NONE),
    "sce-grad-nd": (GRAD, _sce_grad_case(2, 5, "mean", ignored=[1, 4], extra=(3,)), None, ["dx"], MEAN),
    "sce-grad-default-ignore": (GRAD, {**_sce_grad_case(4, 5, "mean"), "label": np.array([-1, 2, 0, 4])}, None, ["dx"], {}),
    # SoftmaxCrossEntropyLoss (forward): the same cases, with and without the log_prob output
    "sce-mean-ignored": (SCE, _sce_case(6, 7, ignored=[0, 3]), None, ["loss", "log_prob"], MEAN),
    "sce-sum-loss-only": (SCE, _sce_case(6, 7, ignored=[5]), None, ["loss"], SUM),
    "sce-none": (SCE, _sce_case(6, 7, ignored=[1]), None, ["loss", "log_prob"], NONE),
    "sce-all-ignored": (SCE, _sce_case(3, 7, ignored=[0, 1, 2]), None, ["loss", "log_prob"], MEAN),
    "sce-weighted-mean": (SCE, _sce_case(6, 7, ignored=[2], weight=True), None, ["loss"], MEAN),
    "sce-nd": (SCE, _sce_case(2, 5, ignored=[1, 4], extra=(3,)), None, ["loss", "log_prob"], MEAN),
    "sce-default-ignore": (SCE, {**_sce_case(4, 5), "label": np.array([-1, 2, 0, 4])}, None, ["loss"], {}),
}


def _domain(op):
    return "" if op == "SoftmaxCrossEntropyLoss" else "com.microsoft"


@pytest.mark.parametrize("case", list(CASES))
def test_rule_matches_the_training_operator(case):
    op, inputs, consts, outputs, attrs = CASES[case]
    model = _model(op, inputs, outputs, consts, domain=_domain(op), **attrs)
    expected = _run(model, inputs)
    rewritten = copy.deepcopy(model)
    count, unsupported = make_stock(rewritten)
    assert (count, unsupported) == (1, [])
    assert [n.op_type for n in rewritten.graph.node if not is_stock(n.domain, n.op_type)] == []
    got = _run(rewritten, inputs)
    assert len(got) == len(expected)
    for name, g, x in zip([o for o in outputs if o], got, expected):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert np.all(np.isfinite(g)), name
        scale = max(1.0, float(np.abs(x).max(initial=0)))
        np.testing.assert_allclose(g, x, rtol=1e-5, atol=1e-6 * scale, err_msg=f"{case}: {name}")


def test_every_rule_has_cases():
    assert {(_domain(op), op) for op, *_ in CASES.values()} == set(RULES)


@pytest.mark.parametrize("op, inputs, consts, attrs, reason", [
    ("SliceGrad", *_slice_case((4, 6), [0], [6], axes=[1], steps=[2]), {}, "steps"),
    ("GatherGrad", {"shape": np.array([2, 4]), "indices": np.array([3, 0]), "dy": _f(2, 2)}, None, {"axis": 1}, "axis 1"),
    ("SoftmaxCrossEntropyLossGrad", _sce_grad_case(3, 4, "mean"), None, {"reduction": "max"}, "reduction"),
])
def test_configuration_a_rule_does_not_cover_is_reported(op, inputs, consts, attrs, reason):
    model = _model(op, inputs, ["out"], consts, **attrs)
    count, unsupported = make_stock(model)
    assert count == 0 and [(u.op_type, u.node) for u in unsupported] == [(op, f"{op}_under_test")]
    assert reason in unsupported[0].reason
    assert [n.op_type for n in model.graph.node] == [op]  # left as it was


def test_operator_without_rule_is_reported():
    model = _model("Mystery", {"x": _f(2)}, ["y"], domain="com.example")
    count, unsupported = make_stock(model)
    assert count == 0 and unsupported[0].to_dict() == {"op_type": "Mystery", "node": "Mystery_under_test",
                                                        "reason": "no rewrite rule"}
