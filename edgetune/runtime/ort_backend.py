"""The ``ort-training`` backend: ``onnxruntime.training.api`` Module, Optimizer, CheckpointState."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgetune.bundle import Bundle
from edgetune.runtime.ort_import import onnxruntime, training_api
from edgetune.runtime.backend import Batch


def session_options(threads: int):
    ort = onnxruntime()

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initializers are noise for users
    # No static buffer sharing between values. ORT's planner lets a later value take over a dead
    # value's buffer of the same size, and then frees the buffer only after the last reader of
    # *any* value on it; in a training graph those chains tie forward buffers to backward values
    # (recomputed activations, gradients), so every forward activation stayed allocated until the
    # backward pass and the exporter's activation recompute saved nothing: 1.27 GB peak RSS
    # instead of 0.55 GB for SmolLM2-135M at 4 x 128 tokens with --recompute full (README,
    # "Where the memory went"). Freed memory still returns to ORT's arena and is reused from
    # there, so steps are not slower.
    options.enable_mem_reuse = False
    return options


class OrtTrainingBackend:
    name = "ort-training"

    def __init__(self, bundle: Bundle, *, checkpoint: Path | None, threads: int, with_eval: bool, training: bool):
        api = training_api()
        manifest = bundle.manifest
        self._names = [t.graph_name for t in manifest.trainable]
        self._state = api.CheckpointState.load_checkpoint(str(checkpoint or bundle.path("checkpoint")))
        self._module = api.Module(
            str(bundle.path("training")), self._state,
            str(bundle.path("eval")) if with_eval else None,
            session_options=session_options(threads),
        )
        self._optimizer = api.Optimizer(str(bundle.path("optimizer")), self._module) if training else None
        self._inputs = [i.name for i in manifest.inputs]

    def _feed(self, batch: Batch) -> list[np.ndarray]:
        return [np.ascontiguousarray(batch[name], dtype=np.int64) for name in self._inputs]

    def train_step(self, batch: Batch) -> float:
        self._module.train()
        return float(self._module(*self._feed(batch)))

    def optimizer_step(self, learning_rate: float) -> None:
        self._optimizer.set_learning_rate(float(learning_rate))
        self._optimizer.step()
        self._module.lazy_reset_grad()

    def discard_gradients(self) -> None:
        self._module.lazy_reset_grad()

    def eval_loss(self, batch: Batch) -> float:
        self._module.eval()
        return float(self._module(*self._feed(batch)))

    def trainable(self) -> dict[str, np.ndarray]:
        return {name: np.array(self._state.parameters[name].data, dtype=np.float32) for name in self._names}

    def set_trainable(self, tensors: dict[str, np.ndarray]) -> None:
        for name, value in tensors.items():
            self._state.parameters[name].data = np.ascontiguousarray(value, dtype=np.float32)

    def save(self, path: Path) -> None:
        training_api().CheckpointState.save_checkpoint(self._state, str(path), include_optimizer_state=self._optimizer is not None)
