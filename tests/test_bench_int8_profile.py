"""The int8 profiling helpers in bench/: the profile aggregation and the int16-pair clipping model."""

from __future__ import annotations

import json

import numpy as np

from bench.int8_saturation import clipped_product
from bench.profile_step import aggregate, last_run_nodes


def _node(name, op, ts, dur):
    return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}


def test_profile_keeps_the_last_run_and_sums_per_op_type_and_node(tmp_path):
    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
        _node("warm", "MatMul", 10, 50),  # the warm-up run: skipped
        {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100},
        _node("a", "MatMulIntegerToFloat", 210, 30), _node("b", "MatMulIntegerToFloat", 250, 10),
        _node("c", "Mul", 270, 20), {"cat": "Node", "name": "c_fence_before", "ts": 269, "dur": 0},
    ]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(events))
    result = aggregate(last_run_nodes(path))
    assert result["kernel_ms"] == 0.06
    assert [(r["op"], r["nodes"], round(r["share"], 3)) for r in result["op_types"]] == [
        ("MatMulIntegerToFloat", 2, 0.667), ("Mul", 1, 0.333)]
    assert [r["node"] for r in result["nodes"]] == ["a", "c", "b"]


def test_clipping_model_is_exact_below_the_int16_range_and_clips_above():
    rng = np.random.default_rng(0)
    a = rng.integers(118, 139, (5, 9), dtype=np.int64).astype(np.uint8)  # a - 128 in [-10, 10]; odd K
    b = rng.integers(-100, 101, (9, 4), dtype=np.int64).astype(np.int8)  # pairs stay within 2 * 138 * 100 < 32767
    exact, clipped, touched = clipped_product(a, b)
    assert np.array_equal(exact, (a.astype(np.int64) - 128) @ b.astype(np.int64))
    assert np.array_equal(clipped, exact) and not touched.any()

    a[1:, :2] = 128  # zero activations against weights of 127: 2 * 128 * 127 = 32512, just inside
    a[0, :2] = 255  # a - 128 = 127 twice, against weights of 127 twice: 2 * 255 * 127 = 64770 -> 32767
    b[:2, 1] = 127
    exact, clipped, touched = clipped_product(a, b)
    assert touched[0, 1] and touched.sum() == 1
    assert clipped[0, 1] - exact[0, 1] == 32767 - 2 * 255 * 127
    assert np.array_equal(np.delete(clipped.ravel(), 1), np.delete(exact.ravel(), 1))
