"""Activation recompute per residual block, as a rewrite of the ONNX Runtime training graph.

A pre-norm transformer's forward is a chain of residual-stream tensors t_0 (embeddings) ->
t_1 -> ... -> t_L, with ``t_{k+1} = Add(t_k, block_k(t_k))`` (attention and MLP blocks
alternate). Exported, the backward pass reads ~30 forward tensors inside every block (norm
outputs, q/k/v, rotary copies, the (B, heads, T, T) softmax, MLP activations): 0.97 GB for
SmolLM2-135M at 4 x 128 tokens, all alive at the forward/backward turn.

Here the backward reads, instead of those tensors, copies made by a clone of the block's forward
nodes; the clone reads ``t_k`` and runs only once ``grad(t_{k+1})`` exists, i.e. right before the
block's own backward. So only the t_k (B, T, hidden) stay alive across the turn, plus one
block's activations at a time. The clone repeats the same operations on the same inputs, so its
values are bit-identical; blocks holding a random operator (Dropout with p > 0) are left alone.

ORT's ``MemoryOptimizer`` offers recompute only for ORTModule graphs (it looks for a YieldOp);
on-device training graphs have none (its plans modified nothing on the LoRA training graph).
"""

from __future__ import annotations

import onnx

from edgetune.export.memory_graph import GraphIndex

RANDOM_OPS = {"Dropout", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
              "Multinomial", "BitmaskDropout", "BiasDropout", "BitmaskBiasDropout"}
ATTENTION_OPS = {"Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention"}
MATMUL_OPS = {"MatMul", "FusedMatMul", "Gemm"}


def residual_stream(g: GraphIndex) -> list[str]:
    """The longest chain t_0 -> t_1 -> ... of forward ``Add(t_k, branch)`` nodes.

    ``t_k`` is the Add input that other forward nodes also read (the next block's norm); the
    branch output is read by this Add alone. A tensor that feeds several such Adds (an attention
    mask added in every layer) is not a stream tensor.
    """
    nxt: dict[str, str | None] = {}
    for i in g.forward:
        n = g.nodes[i]
        if n.op_type != "Add" or len(n.input) != 2 or n.input[0] == n.input[1]:
            continue
        others = [[c for c, _ in g.consumers[t] if c in g.forward and c != i] for t in n.input]
        if others[0] and not others[1]:
            stream = n.input[0]
        elif others[1] and not others[0]:
            stream = n.input[1]
        else:
            continue
        nxt[stream] = None if stream in nxt else n.output[0]  # two candidate Adds: ambiguous
    best: list[str] = []
    starts = set(nxt) - set(nxt.values())
    for t in starts:
        chain = [t]
        while nxt.get(chain[-1]):
            chain.append(nxt[chain[-1]])
        if len(chain) > len(best):
            best = chain
    return best


def _grad_of(g: GraphIndex, tensor: str) -> str | None:
    """The backward tensor holding d loss / d ``tensor`` (ORT names it ``<tensor>_grad``)."""
    name = f"{tensor}_grad"
    return name if name in g.producer and g.producer[name] not in g.forward else None


def _interior(g: GraphIndex, start: str, end: str) -> set[int]:
    """Forward nodes on a path from ``start`` to ``end`` (the block between two stream tensors)."""
    below: set[int] = set()
    stack = [c for c, _ in g.consumers[start] if c in g.forward]
    end_node = g.producer[end]
    while stack:
        i = stack.pop()
        if i in below:
            continue
        below.add(i)
        if i != end_node:
            stack.extend(c for o in g.nodes[i].output for c, _ in g.consumers[o] if c in g.forward)
    above: set[int] = set()
    stack = [end_node]
    start_node = g.producer.get(start)
    while stack:
        i = stack.pop()
        if i in above or i == start_node:
            continue
        above.add(i)
        stack.extend(g.producer[t] for t in g.nodes[i].input if t in g.producer)
    return below & above


def _frozen_matmul(g: GraphIndex, i: int) -> bool:
    """A projection by a frozen weight: MatMul-like whose B is a DequantizeLinear output (maybe
    transposed) or a graph input/initializer that gets no gradient."""
    n = g.nodes[i]
    if n.op_type not in MATMUL_OPS or len(n.input) < 2:
        return False
    w = n.input[1]
    p = g.producer.get(w)
    if p is not None and g.nodes[p].op_type == "Transpose":
        w = g.nodes[p].input[0]
        p = g.producer.get(w)
    if p is not None:
        return g.nodes[p].op_type == "DequantizeLinear" and all(g.is_graph_value(t) for t in g.nodes[p].input if t)
    return f"{w}_grad" not in g.producer  # a trainable tensor has a gradient


def recompute_segments(graph: onnx.GraphProto, loss: str, policy: str, report) -> None:
    """Recompute residual blocks' forward right before their backward.

    ``policy``: ``full`` recomputes every block from its input; ``cheap`` keeps the outputs of
    the frozen-weight projections (q/k/v, gate/up: 8.2 MB per layer at 4 x 128 for SmolLM2)
    and recomputes only what is cheap around them (norms, rotary, attention, activations);
    ``mlp`` keeps only the projections of blocks without attention.
    """
    g = GraphIndex(graph, loss)
    stream = residual_stream(g)
    if len(stream) < 2:
        report.skipped.append("no residual stream found")
        return
    rewires: list[tuple[int, int, str]] = []
    for k in range(len(stream) - 1):
        start, end = stream[k], stream[k + 1]
        block = _interior(g, start, end)
        label = f"block {k} ({g.nodes[g.producer[end]].name})"
        if any(g.nodes[i].op_type in RANDOM_OPS for i in block):
            report.skipped.append(f"{label}: holds a random operator; recomputing would redraw it")
            continue
        grad = _grad_of(g, end)
        if grad is None:
            report.skipped.append(f"{label}: no gradient tensor for its output")
            continue
        attention = any(g.nodes[i].op_type in ATTENTION_OPS for i in block)
        kept = set() if policy == "full" or (policy == "mlp" and attention) else {i for i in block if _frozen_matmul(g, i)}
        before_grad = g.ancestors([grad])  # backward nodes that run before grad(end) must keep the originals
        wanted: dict[str, list[tuple[int, int]]] = {}
        for i in block - kept:
            for o in g.nodes[i].output:
                if o == end:
                    continue  # stored: it is the next block's input
                uses = [(c, j) for c, j in g.consumers[o] if c not in g.forward and c not in before_grad]
                if uses:
                    wanted[o] = uses
        if not wanted:
            continue
        clone = _needed(g, wanted, block, kept)
        tag = f"{g.nodes[g.producer[end]].name}/recompute"
        renamed: dict[str, str] = {}
        for i in sorted(clone):  # file order is topological
            n = onnx.NodeProto()
            n.CopyFrom(g.nodes[i])
            n.name = g.fresh(f"{n.name}/recompute")
            for j, t in enumerate(n.input):
                if t not in renamed and (t == start or g.producer.get(t) in kept):
                    # a stored tensor the clone reads: gate it so the clone waits for grad(end)
                    renamed[t] = g.after(t, grad, tag)
                n.input[j] = renamed.get(t, t)
            for j, t in enumerate(n.output):
                if t:
                    renamed[t] = n.output[j] = g.fresh(f"{t}/recompute")
            g.nodes.append(n)
        report.recomputed_segments += 1
        report.recomputed_nodes += len(clone)
        rewires.extend((c, j, renamed[t]) for t, uses in wanted.items() for c, j in uses)
    for c, j, t in rewires:  # after all blocks: the index above must describe the exported graph
        g.nodes[c].input[j] = t
    g.commit()


def _needed(g: GraphIndex, wanted, block: set[int], kept: set[int]) -> set[int]:
    """Block nodes the wanted tensors depend on, not looking past kept (stored) nodes."""
    seen: set[int] = set()
    stack = [g.producer[t] for t in wanted]
    while stack:
        i = stack.pop()
        if i in seen or i not in block or i in kept:
            continue
        seen.add(i)
        stack.extend(g.producer[t] for t in g.nodes[i].input if t in g.producer)
    return seen
