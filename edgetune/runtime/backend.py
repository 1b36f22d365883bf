"""The seam between the training loop and the engine that runs the graphs.

``ort-training`` (ONNX Runtime's on-device training API) is the one backend today; a
``portable`` backend on the stock ``onnxruntime`` package slots in behind the same protocol.
Every backend works on the same bundle and must produce the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from edgetune.bundle import Bundle
from edgetune.errors import EdgetuneError

Batch = dict[str, np.ndarray]  # input_ids / attention_mask / labels, each (B, T) int64


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

    def save(self, path: Path) -> None:
        """Write weights and optimizer moments to ``path`` (a file the backend can ``load``)."""


BACKENDS = ("ort-training",)


def open_backend(name: str, bundle: Bundle, *, checkpoint: Path | None = None,
                 threads: int = 0, with_eval: bool = False, training: bool = True) -> TrainingBackend:
    """Open ``bundle`` with backend ``name``; ``checkpoint`` resumes from a saved state."""
    if name == "ort-training":
        from edgetune.runtime.ort_backend import OrtTrainingBackend

        return OrtTrainingBackend(bundle, checkpoint=checkpoint, threads=threads,
                                  with_eval=with_eval, training=training)
    raise EdgetuneError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}.")
