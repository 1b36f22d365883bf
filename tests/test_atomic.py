"""Crash-safe writes: folder swaps that never leave the output path empty, ONNX files with external
data, and a full disk told by errno. Kills are real (``os._exit`` in a child process at the
chosen step), so no ``finally`` or ``except`` of the code under test can tidy up after them."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgetune import atomic
from edgetune.atomic import is_disk_full, recover_dir, replace_dir
from edgetune.constants import OPSET
from edgetune.onnx_graph import GraphCycleError, external_files, remove_dead_nodes, save_model, toposort

ROOT = Path(__file__).resolve().parents[1]


def _bundle(folder: Path, tag: str) -> Path:
    folder.mkdir()
    (folder / "manifest.json").write_text(tag)
    (folder / "sub").mkdir()
    (folder / "sub" / "weights.bin").write_bytes(tag.encode() * 1000)
    return folder


def _tag(folder: Path) -> str | None:
    """Which complete bundle is at ``folder`` ("old"/"new"), or None if there is none."""
    if not folder.is_dir():
        return None
    tag = (folder / "manifest.json").read_text()
    assert (folder / "sub" / "weights.bin").read_bytes() == tag.encode() * 1000  # complete, not mixed
    return tag


def test_replace_dir_into_an_empty_place(tmp_path):
    replace_dir(_bundle(tmp_path / ".new", "new"), tmp_path / "out")
    assert _tag(tmp_path / "out") == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("atomic_swap", [True, False])
def test_replace_dir_swaps_and_removes_the_old(tmp_path, monkeypatch, atomic_swap):
    if not atomic_swap:
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    _bundle(tmp_path / "out", "old")
    replace_dir(_bundle(tmp_path / ".new", "new"), tmp_path / "out")
    assert _tag(tmp_path / "out") == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_final_rename_restores_the_old_bundle(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # the two-rename fallback
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # old moved aside; moving the new one in fails
            raise OSError(errno.EIO, "injected failure", str(src))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    _bundle(tmp_path / "out", "old")
    new = _bundle(tmp_path / ".new", "new")
    with pytest.raises(OSError, match="injected"):
        replace_dir(new, tmp_path / "out")
    assert _tag(tmp_path / "out") == "old" and _tag(new) == "new"
    assert len(calls) == 3 and calls[2][1] == "out"  # the restore


def test_failed_swap_leaves_the_old_bundle(tmp_path, monkeypatch):
    def exchange(a, b):
        raise OSError(errno.EACCES, "injected failure", str(a))

    monkeypatch.setattr(atomic, "exchange", exchange)
    _bundle(tmp_path / "out", "old")
    with pytest.raises(OSError, match="injected"):
        replace_dir(_bundle(tmp_path / ".new", "new"), tmp_path / "out")
    assert _tag(tmp_path / "out") == "old"


KILL_SCRIPT = """
import os, shutil, sys
from pathlib import Path
from edgetune import atomic
point, folder = sys.argv[1], Path(sys.argv[2])
real_exchange, real_rename, real_rmtree = atomic.exchange, os.rename, shutil.rmtree
renames = []
def die():
    os._exit(9)
def exchange(a, b):
    if point == "before-swap":
        die()
    if point == "fallback":
        return False
    done = real_exchange(a, b)
    if point == "after-swap":
        die()
    return done
def rename(a, b):
    renames.append(b)
    if point == "fallback" and len(renames) == 2:
        die()  # between moving the old bundle aside and moving the new one in
    real_rename(a, b)
atomic.exchange, os.rename = exchange, rename
atomic.replace_dir(folder / ".new", folder / "out")
"""


@pytest.mark.parametrize("point, expected", [("before-swap", "old"), ("after-swap", "new"), ("fallback", None)])
def test_a_kill_at_any_step_leaves_a_whole_bundle(tmp_path, point, expected):
    _bundle(tmp_path / "out", "old")
    _bundle(tmp_path / ".new", "new")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), point, str(tmp_path)],
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 9, r.stderr
    assert _tag(tmp_path / "out") == expected
    if expected is None:
        # Without an atomic swap a kill between the renames leaves the old bundle set aside;
        # the next export (check_output) puts it back before anything else.
        from edgetune.export.exporter import check_output

        check_output(tmp_path / "out", force=True)
        assert _tag(tmp_path / "out") == "old"
    assert recover_dir(tmp_path / "out") is None
    assert not list(tmp_path.glob(".out.old-*"))


def _model(value: float, n: int = 1000) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.full((n,), value, np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _weight(path: Path) -> float:
    return float(numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])[0])


def test_save_model_with_external_data_replaces_model_and_data(tmp_path):
    path = tmp_path / "m.onnx"
    written = save_model(_model(1.0), path, external_above=0)
    (data,) = external_files(path)
    assert [p.name for p in written] == ["m.onnx", data] and _weight(path) == 1.0
    save_model(_model(2.0), path, external_above=0)
    (data2,) = external_files(path)
    assert data2 != data and _weight(path) == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", data2])  # old data gone, no temp left
    save_model(_model(3.0), path)  # small again: one file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"] and _weight(path) == 3.0


def test_save_model_killed_before_the_model_rename_keeps_the_old_model(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    save_model(_model(1.0), path, external_above=0)
    real_replace = atomic.replace_file

    def replace_file(tmp, target):
        if Path(target).name == "m.onnx":
            raise KeyboardInterrupt  # stopped after the new data file is in, before the model
        real_replace(tmp, target)

    monkeypatch.setattr("edgetune.onnx_graph.replace_file", replace_file)
    with pytest.raises(KeyboardInterrupt):
        save_model(_model(2.0), path, external_above=0)
    assert _weight(path) == 1.0  # the old model still reads its own, untouched data file
    assert not list(tmp_path.glob(".*partial"))


def test_external_files_ignores_locations_outside_the_folder(tmp_path):
    proto = _model(1.0)
    w = proto.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../elsewhere.data"), ("offset", "0"), ("length", "4000")):
        w.external_data.add(key=key, value=value)
    (tmp_path / "m.onnx").write_bytes(proto.SerializeToString())
    assert external_files(tmp_path / "m.onnx") == set()


def test_disk_full_is_told_by_errno_not_text(tmp_path, monkeypatch):
    assert is_disk_full(OSError(errno.ENOSPC, "x"), tmp_path)
    assert not is_disk_full(OSError(errno.EACCES, "No space left on device"), tmp_path)
    # A library error without an errno: the folder is probed; here the disk has room.
    assert not is_disk_full(RuntimeError("write failed: No space left on device"), tmp_path)
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert is_disk_full(RuntimeError("checkpoint write failed"), tmp_path / "not-yet-made")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert not list(tmp_path.iterdir())  # the probe file is gone


def test_toposort_orders_and_refuses_a_cycle():
    a = helper.make_node("Relu", ["b_out"], ["a_out"], name="a")
    b = helper.make_node("Relu", ["x"], ["b_out"], name="b")
    assert [n.name for n in toposort([a, b])] == ["b", "a"]
    c = helper.make_node("Relu", ["a_out"], ["x"], name="c")
    with pytest.raises(GraphCycleError, match="cycle"):
        toposort([a, b, c])


def test_remove_dead_nodes_keeps_what_outputs_need():
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="live"), helper.make_node("Neg", ["h"], ["dead1"], name="d1"),
             helper.make_node("Neg", ["dead1"], ["dead2"], name="d2"), helper.make_node("Abs", ["h"], ["y"], name="out")]
    inits = [numpy_helper.from_array(np.zeros(1, np.float32), n) for n in ("x", "unused")]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits)
    assert remove_dead_nodes(graph, initializers=True) == 2
    assert [n.name for n in graph.node] == ["live", "out"] and [t.name for t in graph.initializer] == ["x"]


def test_ensure_free_space_raises_a_real_enospc(tmp_path):
    from edgetune.atomic import ensure_free_space

    ensure_free_space(tmp_path, 1)
    st = os.statvfs(tmp_path)
    with pytest.raises(OSError) as err:
        ensure_free_space(tmp_path / "missing" / "deeper", st.f_bavail * st.f_frsize + (1 << 40))
    assert err.value.errno == errno.ENOSPC and is_disk_full(err.value, tmp_path)
