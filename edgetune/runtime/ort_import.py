"""Import ONNX Runtime on the device without pulling in torch.

Two things in the ``onnxruntime-training`` build import torch whenever it is installed:
``import onnxruntime`` itself (its build validation tries ``onnxruntime.training.ortmodule``) and
``onnxruntime/training/__init__.py`` (its optimizer helpers). Neither is needed on a device: the
on-device API (Module, Optimizer, CheckpointState) only needs the compiled extension. So before
ONNX Runtime is first imported, ``onnxruntime.training`` is registered as a bare package over its
own folder and ``ortmodule`` as absent; ``api`` is then imported from it directly. Without torch
installed nothing changes; with torch installed, the device half still never loads it.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

from edgetune.errors import BundleError

MISSING = ("the ort-training backend needs onnxruntime-training-cpu==1.19.2 (x86-64 Linux, Python 3.10/3.11); "
           "install it with `pip install onnxruntime-training-cpu==1.19.2`, or use --backend portable "
           "(the stock onnxruntime package).")


def _training_folder() -> Path | None:
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "training"
    return folder if (folder / "api").is_dir() else None


def training_build_installed() -> bool:
    """Whether the installed ``onnxruntime`` is the training build (found without importing it)."""
    return _training_folder() is not None


def onnxruntime():
    """The ``onnxruntime`` module, imported without its torch-loading side paths."""
    if "onnxruntime" not in sys.modules:
        folder = _training_folder()
        if folder is not None and "onnxruntime.training" not in sys.modules:
            package = types.ModuleType("onnxruntime.training")
            package.__path__ = [str(folder)]
            sys.modules["onnxruntime.training"] = package
            sys.modules["onnxruntime.training.ortmodule"] = None  # "not installed" to ORT's build check
    try:
        import onnxruntime as ort
    except ImportError:
        raise BundleError("edgetune needs ONNX Runtime; reinstall edgetune, which brings onnxruntime-training-cpu "
                          "(x86-64 Linux, Python 3.10/3.11) or the stock onnxruntime package.") from None
    return ort


def training_api():
    """``onnxruntime.training.api``; BundleError when the training build is not installed.

    Only ``ort_backend`` calls this: everything else reaches the training build through the backend.
    """
    onnxruntime()
    if _training_folder() is None:  # the stock inference package has no training API
        raise BundleError(MISSING)
    from onnxruntime.training import api

    return api
