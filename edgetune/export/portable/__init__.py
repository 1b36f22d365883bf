"""The portable gradient graph: what the stock ``onnxruntime`` package (every platform and Python
it ships for) needs to train a bundle, written at export beside ONNX Runtime's training artifacts.

``export_portable(folder, trainable)`` reads the finished artifacts (after the memory plan's
rewrites) and writes ``portable_model.onnx`` (loss and the gradient of every trainable tensor for
one micro-batch), ``portable_eval_model.onnx`` (loss only) and their shared weights file; it
returns the manifest's ``portable`` record:

    {"file", "eval_file", "supported": bool, "unsupported": [{"op_type", "node", "graph", "reason"}],
     "gradients": {graph_name: output name}, "loss": "loss"}

Training-only operators are rewritten into standard ONNX by the rules in ``rules/``. When a node
cannot be rewritten, it is reported, ``supported`` is false and no portable file is written; the
ONNX Runtime training artifacts are unaffected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

BATCH_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")  # position_ids: bundles that pack rows


def export_portable(folder: Path | str, trainable: list[str], report: Callable[[str], None] = lambda msg: None,
                    batch_inputs: tuple[str, ...] | None = None, loss: str = "loss") -> dict:
    import onnx

    from edgetune.export.portable.graphs import eval_graph, gradient_graph
    from edgetune.export.portable.rewrite import make_stock
    from edgetune.export.portable.writer import PORTABLE_EVAL_MODEL, PORTABLE_MODEL, write_graphs

    folder = Path(folder)
    frozen = read_frozen(folder / "checkpoint", trainable)
    # Tensors kept as external data (an int4 bundle's INT4 weights) stay references to their file.
    training = onnx.load(str(folder / "training_model.onnx"), load_external_data=False)
    if batch_inputs is None:  # those of BATCH_INPUTS the training graph takes
        taken = {i.name for i in training.graph.input}
        batch_inputs = tuple(n for n in BATCH_INPUTS if n in taken)
    gradients = gradient_graph(training, list(batch_inputs), trainable, frozen, loss)
    evaluation = onnx.load(str(folder / "eval_model.onnx"), load_external_data=False)
    eval_graph(evaluation, list(batch_inputs), trainable, frozen)
    del frozen
    rewritten, unsupported = 0, []
    for file, model in ((PORTABLE_MODEL, training), (PORTABLE_EVAL_MODEL, evaluation)):
        count, missing = make_stock(model)
        rewritten += count
        unsupported += [{**u.to_dict(), "graph": file} for u in missing]
    record = {"file": PORTABLE_MODEL, "eval_file": PORTABLE_EVAL_MODEL, "supported": not unsupported,
              "unsupported": unsupported, "gradients": gradients, "loss": loss}
    if unsupported:
        for u in unsupported:
            report(f"not portable: {u['op_type']} (node {u['node']!r} in {u['graph']}): {u['reason']}")
        report("no portable graph written: this bundle trains with --backend ort-training only")
        return {**record, "file": None, "eval_file": None, "gradients": {}}
    report(f"writing the portable graphs for stock onnxruntime ({rewritten} training-only nodes rewritten)")
    write_graphs(folder, {PORTABLE_MODEL: training, PORTABLE_EVAL_MODEL: evaluation})
    return record


def read_frozen(checkpoint: Path, trainable: list[str]) -> dict[str, np.ndarray]:
    """Every tensor of the ORT checkpoint that is not trainable (frozen weights, int8 weights with
    their scales and zero points, constants the memory plan added), by graph name."""
    from onnxruntime.training.api import CheckpointState

    state = CheckpointState.load_checkpoint(str(checkpoint))
    skip = set(trainable)
    return {name: np.array(p.data) for name, p in state.parameters if name not in skip}
