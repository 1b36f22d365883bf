"""Write the portable graphs into a bundle folder, their large tensors in one shared file.

Both graphs hold the same frozen weights; each tensor of at least ``EXTERNAL_MIN_BYTES`` is stored
once in ``portable_weights.bin`` (ONNX external data, path relative to the bundle folder) and both
graphs point at it. Offsets are aligned so onnxruntime may map large tensors instead of copying.
Smaller tensors (scales, shapes, rule constants) stay inside each graph. Tensors the training
graph already keeps as external data (an int4 bundle's INT4 weights, ``int4_weights.bin``) stay
where they are: the portable graphs point at the same file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import onnx
from onnx import numpy_helper

PORTABLE_MODEL = "portable_model.onnx"
PORTABLE_EVAL_MODEL = "portable_eval_model.onnx"
PORTABLE_WEIGHTS = "portable_weights.bin"
EXTERNAL_MIN_BYTES = 1024
ALIGN_LARGE, ALIGN_SMALL, LARGE = 4096, 64, 1 << 16


def write_graphs(folder: Path, graphs: dict[str, onnx.ModelProto]) -> None:
    """``graphs``: file name -> model; writes the models and the shared weights file."""
    folder = Path(folder)
    store_external(graphs.values(), folder / PORTABLE_WEIGHTS)
    for name, model in graphs.items():
        onnx.save(model, str(folder / name))  # tensors already external: only the graph is written


def store_external(models, path: Path, select: Callable[[onnx.TensorProto], bool] | None = None) -> None:
    """Move the initializers of ``models`` (of at least ``EXTERNAL_MIN_BYTES``, and ``select``-ed) into
    the file ``path``, each distinct tensor once, and point every copy at it (``location`` = the
    file's name, so the models must be saved beside it). Tensors already external are left as they
    are. The models are changed in place, not saved."""
    stored: dict[tuple, tuple[int, int]] = {}  # (dtype, dims, digest) -> (offset, length)
    with open(path, "wb") as out:
        for model in models:
            for tensor in model.graph.initializer:
                if tensor.data_location == onnx.TensorProto.EXTERNAL or (select is not None and not select(tensor)):
                    continue
                if not tensor.HasField("raw_data"):  # float_data / int64_data fields: to raw bytes
                    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
                raw = tensor.raw_data
                if len(raw) < EXTERNAL_MIN_BYTES:
                    continue
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(raw).digest())
                if key not in stored:
                    align = ALIGN_LARGE if len(raw) >= LARGE else ALIGN_SMALL
                    out.write(b"\0" * (-out.tell() % align))
                    stored[key] = (out.tell(), len(raw))
                    out.write(raw)
                offset, length = stored[key]
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                del tensor.external_data[:]
                for k, v in (("location", Path(path).name), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = k, v
