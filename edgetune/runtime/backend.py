"""The seam between the training loop and the engine that runs the graphs: a name -> factory registry.

``ort-training`` runs ONNX Runtime's on-device training API (``onnxruntime-training-cpu``, x86-64
Linux, Python 3.10/3.11); ``portable`` runs on the stock ``onnxruntime`` package. ``auto`` picks
the training build when it is installed, else the portable one. Every backend works on the same
bundle and must produce the same numbers. A backend is a module beside this one; one
``register_backend`` line below plugs it in (its module is imported only when it is opened).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from edgetune.errors import EdgetuneError

if TYPE_CHECKING:
    from edgetune.bundle import Bundle

Batch = dict[str, np.ndarray]  # input_ids / attention_mask / labels (/ position_ids), each (B, T) int64
AUTO = "auto"


class TrainingBackend(Protocol):
    name: str

    def train_step(self, batch: Batch) -> float:
        """Forward + backward; gradients accumulate until ``optimizer_step``. Returns the loss."""

    def optimizer_step(self, learning_rate: float) -> None:
        """Apply AdamW with ``learning_rate`` to the accumulated gradients, then clear them."""

    def discard_gradients(self) -> None:
        """Drop accumulated gradients without updating (after a NaN loss)."""

    def eval_loss(self, batch: Batch) -> float:
        """Mean loss over the batch's label positions, no gradients."""

    def trainable(self) -> dict[str, np.ndarray]:
        """Current trainable tensors by graph name (copies)."""

    def set_trainable(self, tensors: dict[str, np.ndarray]) -> None:
        """Overwrite trainable tensors by graph name (shapes checked by the caller)."""

    def initial_adapter(self) -> dict[str, np.ndarray]:
        """The trainable tensors as the bundle was exported, by graph name (whatever was loaded or set)."""

    def save(self, path: Path) -> None:
        """Write weights and optimizer moments to ``path`` (a checkpoint the backend's factory can load)."""


# factory(bundle, *, checkpoint, threads, with_eval, training) -> TrainingBackend
Factory = Callable[..., TrainingBackend]


@dataclass(frozen=True)
class _Entry:
    factory: Factory
    available: Callable[[], bool]  # cheap: find_spec, never an import of the engine
    missing: str | Callable[[], str]  # why it is not available and how to make it so

    def why_missing(self) -> str:
        return self.missing() if callable(self.missing) else self.missing


_BACKENDS: dict[str, _Entry] = {}


def register_backend(name: str, factory: Factory, available: Callable[[], bool],
                     missing: str | Callable[[], str] = "") -> None:
    """Make backend ``name`` known to ``--backend``; ``available()`` says whether it can run here."""
    _BACKENDS[name] = _Entry(factory, available, missing or f"the {name} backend cannot run on this machine")


def lazy(target: str) -> Factory:
    """``"package.module:Class"`` as a factory that imports the module on first use."""
    module, _, attr = target.partition(":")

    def factory(*args, **kwargs):
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    return factory


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _training_build() -> bool:
    from edgetune.runtime.ort_import import training_build_installed

    return training_build_installed()


def backend_names() -> list[str]:
    return [AUTO, *_BACKENDS]


def choose_backend(name: str) -> str:
    """Validate ``--backend`` (before any bundle is hashed or data read); resolves ``auto``."""
    if name == AUTO:
        for candidate in ("ort-training", "portable"):
            if candidate in _BACKENDS and _BACKENDS[candidate].available():
                return candidate
        reasons = "; ".join(f"{name}: {entry.why_missing()}" for name, entry in _BACKENDS.items())
        raise EdgetuneError(f"--backend auto found no backend that runs here: {reasons}.")
    if name not in _BACKENDS:
        raise EdgetuneError(f"unknown --backend {name!r}; choose one of: {', '.join(backend_names())}.")
    if not _BACKENDS[name].available():
        raise EdgetuneError(f"--backend {name}: {_BACKENDS[name].why_missing()}.")
    return name


def open_backend(name: str, bundle: "Bundle", *, checkpoint: Path | None = None, threads: int = 0,
                 with_eval: bool = False, training: bool = True) -> TrainingBackend:
    """Open ``bundle`` with backend ``name`` (or ``auto``); ``checkpoint`` resumes from a saved state."""
    from edgetune.runtime.session_options import check_threads

    factory = _BACKENDS[choose_backend(name)].factory
    return factory(bundle, checkpoint=checkpoint, threads=check_threads(threads), with_eval=with_eval,
                   training=training)


register_backend("ort-training", lazy("edgetune.runtime.ort_backend:OrtTrainingBackend"), _training_build,
                 "it needs onnxruntime-training-cpu==1.19.2 (x86-64 Linux, Python 3.10/3.11): "
                 "`pip install onnxruntime-training-cpu==1.19.2`")
def _portable_missing() -> str:
    if not _module_exists("edgetune.runtime.portable_backend"):
        return "this edgetune does not include it; use --backend ort-training"
    return "it needs the onnxruntime package: `pip install onnxruntime`"


register_backend("portable", lazy("edgetune.runtime.portable_backend:PortableBackend"),
                 lambda: _module_exists("edgetune.runtime.portable_backend") and _module_exists("onnxruntime"),
                 _portable_missing)
