"""``export --ort-format``: the training artifacts also in ORT format, for minimal mobile builds.

Size-reduced onnxruntime builds for apps (the Android/iOS packages built with
``--minimal_build``) read only ORT-format models. ``onnxruntime.tools.convert_onnx_models_to_ort``
converts the training, eval and optimizer graphs (and the portable graphs when the bundle has
them) with the "Fixed" optimization style: the graph optimizations an ONNX model gets when a
session loads it are applied once here and saved. The training API of onnxruntime-training
1.19.2 loads these files with the same checkpoint and gives the same losses (tests/test_devices.py).
``required_operators.config`` lists the operators and types a reduced build must include.
The generation graph is not converted.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from pathlib import Path

from edgetune.bundle import Bundle, write_manifest
from edgetune.errors import ExportError

ROLES = ("training", "eval", "optimizer", "portable", "portable_eval")
CONFIG = "required_operators.config"


def write_ort_format(folder: Path | str) -> dict:
    """Add ``<name>.ort`` beside each training artifact and record them in the manifest."""
    import onnxruntime
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    folder = Path(folder)
    bundle = Bundle.open(folder, verify=False)  # export just wrote and hashed it
    sources = {role: bundle.path(role) for role in ROLES if bundle.has(role)}
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        inputs, outputs = Path(tmp) / "in", Path(tmp) / "out"
        inputs.mkdir()
        for path in sources.values():
            (inputs / path.name).symlink_to(path.resolve())
        for name in bundle.manifest.files:  # external data (e.g. the portable graph's weights) beside them
            if not name.endswith(".onnx") and not (inputs / name).exists():
                (inputs / name).symlink_to((folder / name).resolve())
        onnxruntime.set_default_logger_severity(3)  # its warnings about unused constants are not the user's
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per file converted
                convert_onnx_models_to_ort(inputs, output_dir=outputs, optimization_styles=[OptimizationStyle.Fixed])
        except Exception as exc:  # the converter raises plain exceptions
            raise ExportError(f"converting the training artifacts to ORT format failed: {exc}") from None
        files = {}
        for role, path in sources.items():
            converted = outputs / f"{path.stem}.ort"
            if not converted.is_file():
                raise ExportError(f"the ORT-format converter wrote no {converted.name}; export without --ort-format.")
            shutil.move(str(converted), str(folder / converted.name))
            files[role] = converted.name
        shutil.move(str(outputs / CONFIG), str(folder / CONFIG))
    record = {"files": files, "required_operators": CONFIG, "optimization_style": "Fixed",
              "tool": "onnxruntime.tools.convert_onnx_models_to_ort", "onnxruntime": onnxruntime.__version__}
    bundle.manifest.producer["ort_format"] = record
    write_manifest(folder, bundle.manifest)
    return record
