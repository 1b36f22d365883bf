"""Fold a LoRA adapter into the generation graph: a stand-alone inference graph (no torch).

For each adapted linear layer the generation graph holds (as traced from ``LoraLinear.forward``)

    x ─ MatMul(Transpose(W)) ─────────────────────────────── Add ─ y
    x ─ MatMul(Transpose(A)) ─ MatMul(Transpose(B)) ─ Mul(s) ─┘

with A and B graph inputs. Merging sets W' = W + s * B @ A, makes the consumers of the Add read
the base MatMul's output directly, and drops the branch. The join Add is found from the graph,
not from node names: walking the (topologically sorted) nodes, a tensor is "tainted" by a layer
when it depends on that layer's A or B; the first Add with one tainted and one clean input is
the join, and its clean input is the base output. The base weight is the declared
``<module>.base.weight`` (fp32 initializer, or the output of an int8 DequantizeLinear, in which
case it is dequantized, merged and re-quantized per row by ``edgetune.quantization``'s rule). In a
graph with the int8 kernels (``export/generation_kernels.py``) the base weight is the
``<module>.base.weight.nbits`` triple of one MatMulNBits: its int8 values are read back
(``join_nibbles``), merged and re-quantized the same way, then split again; an int4 bundle's
``.nbits4`` blocks are dequantized, merged and re-quantized block-wise (``quantize_blocks``).
The merged graph is written crash-safely by ``onnx_graph.save_model`` (temp folder, fsync, rename).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgetune.bundle import Manifest
from edgetune.errors import BundleError
from edgetune.onnx_graph import remove_dead_nodes, save_model, sort_graph
from edgetune.quantization import (NBITS4_SUFFIXES, NBITS_SUFFIXES, blocks_to_nbits, dequantize_blocks, dequantize_rows,
                                   join_nibbles, nbits_to_blocks, quantize_blocks, quantize_rows, split_nibbles)


def merge_adapter(bundle_dir: Path | str, manifest: Manifest, adapter: dict[str, np.ndarray], out_path: Path | str) -> None:
    """Write ``out_path``: the bundle's generation graph with ``adapter`` (graph_name -> array) folded in."""
    from edgetune.methods import get_method
    from edgetune.runtime.adapter_source import check_adapter

    info = manifest.generation
    if info is None:
        raise BundleError(f"bundle {str(bundle_dir)!r} has no generation graph to merge into; re-export it.")
    if manifest.method.get("name") != "lora":  # the graph surgery below finds LoRA branches
        raise BundleError(f"merging needs a LoRA bundle; this bundle's method is {manifest.method.get('name')!r}.")
    spec = get_method("lora")
    config = spec.config(manifest)
    check_adapter(manifest, adapter)
    from edgetune.fixed_adapter import read_fixed

    adapter = {**read_fixed(bundle_dir, manifest), **adapter}  # + adapter tensors never trained (FFA-LoRA's A)
    path = Path(bundle_dir) / info.file
    if not path.is_file():
        raise BundleError(f"bundle {str(bundle_dir)!r} is missing its generation graph {info.file}; copy or re-export it.")
    proto = onnx.load(str(path))
    tensors = {name: np.asarray(adapter[g], dtype=np.float32) for name, g in info.adapter_inputs.items()}
    merge_lora_graph(proto, tensors, lambda module, layer: spec.weight_delta(config, layer, module))
    save_model(proto, Path(out_path))


def merge_lora_graph(proto: onnx.ModelProto, tensors: dict[str, np.ndarray], weight_delta) -> None:
    """In place: fold every ``<module>.lora_A`` / ``<module>.lora_B`` input pair (given in ``tensors``).

    ``weight_delta(module, {"lora_A": A, "lora_B": B}) -> (out, in)`` is the method's merge
    (``MethodSpec.weight_delta``); ``module`` is the layer's path, whose rank and alpha patterns may set its scaling.
    """
    graph = proto.graph
    layers: dict[str, dict[str, str]] = {}  # module -> {"lora_A": input name, "lora_B": input name}
    for name in tensors:
        module, _, attr = name.rpartition(".")
        layers.setdefault(module, {})[attr] = name
    broken = [m for m, pair in layers.items() if set(pair) != {"lora_A", "lora_B"}]
    if broken:
        raise BundleError(f"adapter inputs of {', '.join(broken)} are not lora_A/lora_B pairs; re-export the bundle.")
    joins = _find_joins(graph, {pair[a]: m for m, pair in layers.items() for a in pair})
    not_found = [m for m in layers if m not in joins]
    if not_found:
        raise BundleError(f"no LoRA branch found in the generation graph for {', '.join(not_found)}; re-export the bundle.")
    inits = {t.name: t for t in graph.initializer}
    dq = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for module, pair in layers.items():
        weight = f"{module}.base.weight"
        stored = next((weight + suffix[0] for suffix in (NBITS_SUFFIXES, NBITS4_SUFFIXES) if weight + suffix[0] in inits),
                      weight)
        if uses.get(stored, 0) != 1:  # shared (e.g. tied) weight: merging would change its other uses too
            raise BundleError(f"base weight {weight!r} is read by {uses.get(stored, 0)} nodes; "
                              "merging supports layers with their own weight only.")
        delta = weight_delta(module, {role: tensors[name] for role, name in pair.items()})  # (out, in)
        _fold(inits, dq, weight, delta)
    # Consumers of each join Add read the base output instead; the branch then feeds nothing.
    rename = {join.output[0]: base_out for join, base_out in joins.values()}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    identities = [onnx.helper.make_node("Identity", [rename[out.name]], [out.name])
                  for out in graph.output if out.name in rename]  # a join feeding a graph output: keep its name
    adapter_names = set(tensors)
    kept_inputs = [i for i in graph.input if i.name not in adapter_names]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    sort_graph(graph, identities)
    remove_dead_nodes(graph, initializers=True)


def _find_joins(graph: onnx.GraphProto, taint: dict[str, str]) -> dict[str, tuple[onnx.NodeProto, str]]:
    """module -> (join Add node, base-output tensor), by tainting from the adapter inputs."""
    taint = dict(taint)  # tensor -> module whose A/B it depends on
    joins: dict[str, tuple[onnx.NodeProto, str]] = {}
    for node in graph.node:
        modules = {taint[i] for i in node.input if i in taint}
        if not modules:
            continue
        if node.op_type == "Add" and len(modules) == 1 and len(node.input) == 2:
            module = next(iter(modules))
            clean = [i for i in node.input if i not in taint]
            if module not in joins and len(clean) == 1:
                joins[module] = (node, clean[0])
                continue  # the join's output is the layer output: later nodes are not the branch
        for module in modules - set(joins):
            for out in node.output:
                taint[out] = module
    return joins


def _fold(inits, dq, weight: str, delta: np.ndarray) -> None:
    """W (out, in) += delta, for an fp32 initializer or an int8 DequantizeLinear(q, scale, zp, axis=0)."""
    if weight in inits:
        w = numpy_helper.to_array(inits[weight])
        _check(weight, w.shape, delta.shape)
        inits[weight].CopyFrom(numpy_helper.from_array((w + delta).astype(np.float32), weight))
    elif weight in dq:
        q_name, scale_name = dq[weight].input[0], dq[weight].input[1]
        w = dequantize_rows(numpy_helper.to_array(inits[q_name]), numpy_helper.to_array(inits[scale_name]))
        _check(weight, w.shape, delta.shape)
        q, scale = quantize_rows(w + delta)
        inits[q_name].CopyFrom(numpy_helper.from_array(q, q_name))
        inits[scale_name].CopyFrom(numpy_helper.from_array(scale, scale_name))
    elif weight + NBITS_SUFFIXES[0] in inits:  # MatMulNBits on split int8 (B, scales, zero points)
        names = [weight + suffix for suffix in NBITS_SUFFIXES]
        b = numpy_helper.to_array(inits[names[0]])
        q, scale = join_nibbles(b, numpy_helper.to_array(inits[names[1]]))
        w = dequantize_rows(q, scale)
        _check(weight, w.shape, delta.shape)
        q, scale = quantize_rows(w + delta)
        for name, value in zip(names, split_nibbles(q, scale, b.shape[2] * 2)):
            inits[name].CopyFrom(numpy_helper.from_array(value, name))
    elif weight + NBITS4_SUFFIXES[0] in inits:  # MatMulNBits on int4 blocks of W^T (an int4 bundle)
        names = [weight + suffix for suffix in NBITS4_SUFFIXES]
        b = numpy_helper.to_array(inits[names[0]])
        block_size = b.shape[2] * 2
        wt = dequantize_blocks(*nbits_to_blocks(b, numpy_helper.to_array(inits[names[1]]), delta.shape[1]), block_size)
        _check(weight, wt.T.shape, delta.shape)
        merged = blocks_to_nbits(*quantize_blocks((wt.T + delta).T.copy(), block_size), block_size)
        for name, value in zip(names, merged):
            inits[name].CopyFrom(numpy_helper.from_array(value, name))
    else:
        raise BundleError(f"base weight {weight!r} is not in the generation graph; re-export the bundle.")


def _check(weight: str, shape, delta_shape) -> None:
    if tuple(shape) != tuple(delta_shape):
        raise BundleError(f"base weight {weight!r} is {tuple(shape)} but B @ A is {tuple(delta_shape)}; "
                          "the adapter was made for another model.")

