"""ONNX graph plumbing shared by every graph rewrite (quantize, memory rewrites, merge).

* ``toposort`` / ``sort_graph``: the node order ONNX requires, keeping the given order where it
  can, and refusing a cycle (a rewrite bug) instead of writing a graph no runtime loads.
* ``remove_dead_nodes``: drop nodes (and, if asked, initializers) no graph output depends on.
* ``attr`` / ``set_attr``: read or overwrite one node attribute.
* ``save_model``: write a model and its external data crash-safely (temp folder, fsync, rename).

onnx only (no torch): the device half imports this for ``merge``.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import onnx
from onnx import helper

from edgetune.atomic import fsync_dir, fsync_file, replace_file

# protobuf cannot serialise a message over 2 GB: above this many bytes of weights they go to a
# separate data file beside the model.
EXTERNAL_DATA_ABOVE = 1_800_000_000


class GraphCycleError(RuntimeError):
    """A rewrite produced a cycle: a bug in the rewrite, never a user mistake."""


def toposort(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Depth-first topological order that keeps the given order where it can.

    A node is emitted right after the producers it still needs, so an appended node (a
    recomputed clone, a DequantizeLinear) lands just before its first consumer. Raises
    ``GraphCycleError`` naming a node on the cycle.
    """
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    done = [False] * len(nodes)
    open_ = [False] * len(nodes)  # on the current DFS path: meeting one again means a cycle
    order: list[onnx.NodeProto] = []
    for root in range(len(nodes)):
        stack = [(root, False)]
        while stack:  # iterative: the graphs have tens of thousands of nodes
            i, expanded = stack.pop()
            if done[i]:
                continue
            if expanded:
                done[i], open_[i] = True, False
                order.append(nodes[i])
                continue
            if open_[i]:
                raise GraphCycleError(f"graph rewrite made a cycle through node {nodes[i].name or nodes[i].op_type!r}")
            open_[i] = True
            stack.append((i, True))
            for name in reversed(nodes[i].input):
                p = producer.get(name)
                if p is not None and not done[p]:
                    stack.append((p, False))
    return order


def sort_graph(graph: onnx.GraphProto, extra: Iterable[onnx.NodeProto] = ()) -> None:
    """In place: the graph's nodes plus ``extra``, topologically sorted."""
    ordered = toposort(list(graph.node) + list(extra))
    del graph.node[:]
    graph.node.extend(ordered)


def remove_dead_nodes(graph: onnx.GraphProto, initializers: bool = False) -> int:
    """Drop nodes that no graph output depends on (and unread initializers if asked); returns nodes dropped.

    Order-independent: liveness is walked back from the outputs through the producers.
    """
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    needed = {o.name for o in graph.output}
    live: set[int] = set()
    stack = [producer[t] for t in needed if t in producer]
    while stack:
        i = stack.pop()
        if i in live:
            continue
        live.add(i)
        for t in graph.node[i].input:
            if t:
                needed.add(t)
                if t in producer:
                    stack.append(producer[t])
    kept = [n for i, n in enumerate(graph.node) if i in live]
    dropped = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(kept)
    if initializers:
        inits = [t for t in graph.initializer if t.name in needed]
        del graph.initializer[:]
        graph.initializer.extend(inits)
    return dropped


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute ``name`` of ``node`` (ints, floats, bytes, tensors as onnx gives them)."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for a in node.attribute:
        if a.name == name:
            node.attribute.remove(a)
            break
    node.attribute.append(helper.make_attribute(name, value))


def external_files(path: Path) -> set[str]:
    """File names (beside ``path``) that the model at ``path`` keeps its external data in.

    Only plain names in the same folder count: a location with a folder part is never ours to
    touch. Reads the graph without its weights.
    """
    with contextlib.suppress(Exception):  # unreadable or not ONNX: nothing of ours to clean up
        proto = onnx.load(str(path), load_external_data=False)
        names = set()
        for t in proto.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location" and entry.value == Path(entry.value).name and entry.value not in ("", ".", ".."):
                    names.add(entry.value)
        return names
    return set()


def save_model(proto: onnx.ModelProto, path: Path | str, external_above: int | None = None) -> list[Path]:
    """Write ``proto`` to ``path`` crash-safely; returns the files written (model first).

    A reader sees the old model or the whole new one. Everything is written and fsynced in a
    temp folder beside ``path``. Weights over ``external_above`` bytes go to
    ``<name>.<random>.data``: a fresh name, so the old model's data file is never overwritten
    while the old model still points at it. The data file is renamed in first, then the model
    over the old one; the old model's own data files are removed last. A kill between the two
    renames leaves the old model intact plus one unreferenced data file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    limit = EXTERNAL_DATA_ABOVE if external_above is None else external_above
    big = sum(t.ByteSize() for t in proto.graph.initializer) > limit
    old_data = external_files(path) if path.is_file() else set()
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        staged = tmp / path.name
        data_name = None
        if big:
            data_name = f"{path.name}.{secrets.token_hex(4)}.data"
            onnx.save(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
            fsync_file(tmp / data_name)
            replace_file(tmp / data_name, path.parent / data_name)
        else:
            onnx.save(proto, str(staged))
        fsync_file(staged)
        replace_file(staged, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name in old_data - {data_name}:
        with contextlib.suppress(OSError):
            (path.parent / name).unlink()
    fsync_dir(path.parent)
    return [path] + ([path.parent / data_name] if data_name else [])
