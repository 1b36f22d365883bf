"""Weight-only kernels for the generation graph: decode from the int8 weights, never an fp32 copy.

The int8 rewrite (``export/quantize.py``) reads a frozen linear weight as
``DequantizeLinear(q (out, in) int8, scale (out,), axis=0) -> Transpose -> MatMul``. ONNX Runtime
either folds that into an fp32 constant at load (4x the weight memory: 1.7 GB peak RSS for
SmolLM2-135M) or, when told not to, dequantizes every weight at every token (10x slower). Here
each such MatMul becomes one com.microsoft ``MatMulNBits`` node that reads the int8 values as
they are, with the same numbers:

  MatMulNBits in onnxruntime 1.19.2 (the training build) takes 4-bit weights only ("Only 4b
  quantization is supported"), so each int8 value q in [-127, 127] is split exactly into two
  nibbles: q = 16 * hi + lo with hi = floor(q / 16) in [-8, 7] and lo in [0, 15]. Then

      x @ (s * q)^T = [x, x] @ [16 s * hi ; s * lo]^T

  i.e. ONE MatMulNBits over K' = 2 * in, fed ``Concat(x, x)``: the first in/block_size blocks
  hold hi + 8 (zero point 8, scale 16 s), the rest hold lo (zero point 0, scale s). Scales and
  zero points are per block and output column, so both halves fit one weight. The block size is
  the largest of 256..16 dividing ``in`` (a block never straddles the halves); the weight takes 8
  bits per value plus one fp32 scale per block (block 64: +0.125 byte per value).
  With ``accuracy_level`` 0 the kernel dequantizes blocks to fp32 and multiplies in fp32, so
  the logits equal the fp32-copy path's up to fp32 summation order (tests check it). That costs
  time: on SmolLM2-135M at one thread, 61 CPU ms per token against 43-46 ms with fp32 copies
  (README, "Generation on the device"); ``generate --compute int8`` sets accuracy_level 4 instead.

``MatMulNBits`` is in the stock onnxruntime CPU build (every platform) and in the 1.19.2 training
build; ONNX Runtime has no gradient for it, so this rewrite is for the generation graph only.
The embedding lookup keeps reading the int8 table (``Gather`` + scale), and a head tied to the
embedding gets its own split copy (int8-sized) next to it.

An int4 bundle's generation graph (``int4_linears_to_nbits``) stores each frozen linear weight as
the training graph does (``quantization.quantize_blocks`` of W^T, symmetric, zero point 0) in
MatMulNBits' own 4-bit layout (value + 8 with its default zero point 8), so generation computes
with the same rounded base that training does; the embedding and a head tied to it stay int8.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from edgetune.onnx_graph import attr, sort_graph
from edgetune.quantization import NBITS4_SUFFIXES, NBITS_SUFFIXES, block_size_for, blocks_to_nbits, quantize_blocks, split_nibbles

MS_DOMAIN = "com.microsoft"
KERNEL = "int8-split-nibbles"  # manifest tag: the graph's frozen linears run MatMulNBits on split int8
KERNEL_INT4 = "int4-blocks"  # --quantize int4: the linears run MatMulNBits on the training graph's int4 blocks


def int8_linears_to_nbits(model: onnx.ModelProto) -> int:
    """In place: every ``DequantizeLinear(int8, axis=0) -> Transpose -> MatMul`` becomes one MatMulNBits.

    Returns the number of MatMuls rewritten. A weight with any other reader keeps its
    DequantizeLinear for that reader.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers = _readers(graph)
    drop: set[int] = set()  # id() of nodes replaced
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    rewritten = 0
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        q_init, s_init = inits.get(dq.input[0]), inits.get(dq.input[1])
        if (q_init is None or s_init is None or q_init.data_type != onnx.TensorProto.INT8 or len(q_init.dims) != 2
                or attr(dq, "axis", 1) != 0 or not _zero_point_is_zero(dq, inits)):
            continue
        n, k = q_init.dims
        bs = block_size_for(k)
        if bs is None:
            continue
        matmuls = []  # (transpose, matmul) pairs this weight feeds as the right-hand side
        for t in readers.get(dq.output[0], []):
            if t.op_type == "Transpose" and attr(t, "perm", [1, 0]) == [1, 0]:
                for mm in readers.get(t.output[0], []):
                    if mm.op_type == "MatMul" and mm.input[1] == t.output[0] and mm.input[0] != t.output[0]:
                        matmuls.append((t, mm))
        if not matmuls:
            continue
        b, scales, zp = split_nibbles(numpy_helper.to_array(q_init), numpy_helper.to_array(s_init), bs)
        base = dq.input[0].removesuffix(".int8")
        names = tuple(base + suffix for suffix in NBITS_SUFFIXES)
        new_inits += [numpy_helper.from_array(v, nm) for v, nm in zip((b, scales, zp), names)]
        for t, mm in matmuls:
            x, twice = mm.input[0], f"{mm.output[0]}/x_twice"
            new_nodes += [
                helper.make_node("Concat", [x, x], [twice], axis=-1, name=f"{mm.name or mm.output[0]}/Concat"),
                helper.make_node("MatMulNBits", [twice, *names], list(mm.output), domain=MS_DOMAIN,
                                 K=2 * k, N=n, bits=4, block_size=bs, accuracy_level=0,
                                 name=f"{mm.name or mm.output[0]}/MatMulNBits"),
            ]
            drop.add(id(mm))
            rewritten += 1
    _replace_nodes(model, drop, new_nodes, new_inits, bool(rewritten))
    return rewritten


def _replace_nodes(model: onnx.ModelProto, drop: set[int], new_nodes: list[onnx.NodeProto],
                   new_inits: list[onnx.TensorProto], changed: bool) -> None:
    """Drop the nodes whose id() is in ``drop``, add ``new_nodes`` (placed by sort_graph) and
    ``new_inits``, remove what no node reads any more, and import the com.microsoft domain when
    anything changed (MatMulNBits lives there)."""
    graph = model.graph
    kept = [nd for nd in graph.node if id(nd) not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_inits)
    sort_graph(graph, new_nodes)
    _remove_unread(graph)
    if changed and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _zero_point_is_zero(dq: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    if len(dq.input) < 3 or not dq.input[2]:
        return False  # no zero point: ONNX types the output uint8 — not the int8 rewrite's graph
    zp = inits.get(dq.input[2])
    return zp is not None and zp.data_type == onnx.TensorProto.INT8 and not numpy_helper.to_array(zp).any()


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node reads, in ``graph`` and in the subgraphs of its nodes (If, Loop bodies)."""
    names = set()
    for node in graph.node:
        names.update(node.input)
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= _read_names(sub)
    return names


def _remove_unread(graph: onnx.GraphProto) -> None:
    """Drop Transposes / DequantizeLinears no one reads any more, then initializers no node reads."""
    outputs = {o.name for o in graph.output}
    changed = True
    while changed:
        read = _read_names(graph) | outputs
        dead = [nd for nd in graph.node if nd.op_type in ("Transpose", "DequantizeLinear")
                and not any(o in read for o in nd.output)]
        for nd in dead:
            graph.node.remove(nd)
        changed = bool(dead)
    read = _read_names(graph) | outputs
    unread = [t for t in graph.initializer if t.name not in read]
    for t in unread:
        graph.initializer.remove(t)


def int4_linears_to_nbits(model: onnx.ModelProto, names: list[str], block_size: int) -> list[str]:
    """In place: each named fp32 weight W (out, in) read only as ``Transpose -> MatMul`` (right-hand side)
    becomes int4 blocks of W^T read by MatMulNBits. Returns the names rewritten; others are left alone."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers = _readers(graph)
    drop: set[int] = set()
    new_nodes: list[onnx.NodeProto] = []
    done: list[str] = []
    for name in names:
        matmuls = _rhs_matmuls(name, readers)
        if matmuls is None:
            continue
        w = numpy_helper.to_array(inits[name])  # (out, in)
        n, k = w.shape
        b, scales = blocks_to_nbits(*quantize_blocks(w.T.copy(), block_size), block_size)
        stored = [name + suffix for suffix in NBITS4_SUFFIXES]
        graph.initializer.extend([numpy_helper.from_array(b, stored[0]), numpy_helper.from_array(scales, stored[1])])
        for mm in matmuls:
            new_nodes.append(helper.make_node("MatMulNBits", [mm.input[0], *stored], list(mm.output), domain=MS_DOMAIN,
                                              K=k, N=n, bits=4, block_size=block_size, accuracy_level=0,
                                              name=f"{mm.name or mm.output[0]}/MatMulNBits"))
            drop.add(id(mm))
        done.append(name)
    _replace_nodes(model, drop, new_nodes, [], bool(done))
    return done


def _rhs_matmuls(name: str, readers: dict[str, list[onnx.NodeProto]]) -> list[onnx.NodeProto] | None:
    """The MatMuls reading ``Transpose(name)`` as their right-hand side; None when ``name`` has any other reader."""
    found = []
    for t in readers.get(name, []):
        if t.op_type != "Transpose" or attr(t, "perm", [1, 0]) != [1, 0]:
            return None
        for mm in readers.get(t.output[0], []):
            if mm.op_type != "MatMul" or mm.input[1] != t.output[0] or mm.input[0] == t.output[0]:
                return None
            found.append(mm)
    return found or None
