"""The ``ort-training`` backend: ``onnxruntime.training.api`` Module, Optimizer, CheckpointState.

The only module that uses ONNX Runtime's training build. Opened with ``training`` or ``with_eval``
it loads the checkpoint and builds its sessions at once; opened with neither, it loads the
checkpoint when tensors are first read and the training session only when tensors are written
or a step runs, so reading the initial adapter never builds a session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgetune.runtime.backend import Batch
from edgetune.runtime.batches import graph_inputs
from edgetune.runtime.ort_import import training_api
from edgetune.runtime.session_options import training_options


class OrtTrainingBackend:
    name = "ort-training"

    def __init__(self, bundle, *, checkpoint: Path | None, threads: int, with_eval: bool, training: bool):
        self._bundle = bundle
        self._checkpoint = Path(checkpoint) if checkpoint is not None else None
        self._threads, self._with_eval, self._training = threads, with_eval, training
        manifest = bundle.manifest
        self._names = [t.graph_name for t in manifest.trainable]
        self._inputs = [(i.name, np.dtype(i.dtype)) for i in manifest.inputs]  # dpo adds float32 ref_logps
        self._loaded = None  # CheckpointState
        self._module = None
        self._optimizer = None
        if training or with_eval:  # opened to run: load now, so a step's time and memory are the step's
            self._sessions()

    # --- lazily loaded engine objects ---------------------------------------------------------
    @property
    def _state(self):
        if self._loaded is None:
            path = self._checkpoint or self._bundle.path("checkpoint")
            self._loaded = training_api().CheckpointState.load_checkpoint(str(path))
        return self._loaded

    def _sessions(self):
        if self._module is None:
            api = training_api()
            self._module = api.Module(
                str(self._bundle.path("training")), self._state,
                str(self._bundle.path("eval")) if self._with_eval else None,
                session_options=training_options(self._threads),
            )
            if self._training:
                self._optimizer = api.Optimizer(str(self._bundle.path("optimizer")), self._module)
        return self._module

    def _feed(self, batch: Batch) -> list[np.ndarray]:
        return graph_inputs(batch, [name for name, _ in self._inputs], [dtype for _, dtype in self._inputs])

    # --- TrainingBackend ----------------------------------------------------------------------
    def train_step(self, batch: Batch) -> float:
        module = self._sessions()
        module.train()
        return float(module(*self._feed(batch)))

    def optimizer_step(self, learning_rate: float) -> None:
        self._sessions()
        self._optimizer.set_learning_rate(float(learning_rate))
        self._optimizer.step()
        self._module.lazy_reset_grad()

    def discard_gradients(self) -> None:
        self._sessions().lazy_reset_grad()

    def eval_loss(self, batch: Batch) -> float:
        module = self._sessions()
        module.eval()
        return float(module(*self._feed(batch)))

    def trainable(self) -> dict[str, np.ndarray]:
        return self._read(self._state)

    def set_trainable(self, tensors: dict[str, np.ndarray]) -> None:
        # The state's parameter buffers are writable once the Module holds them; writing to a merely
        # loaded CheckpointState crashes the process (segmentation fault in onnxruntime 1.19.2).
        self._sessions()
        state = self._state
        for name, value in tensors.items():
            state.parameters[name].data = np.ascontiguousarray(value, dtype=np.float32)

    def initial_adapter(self) -> dict[str, np.ndarray]:
        if self._checkpoint is None and self._module is None:  # no session yet: nothing wrote to the state
            return self._read(self._state)  # the bundle's own checkpoint, as loaded
        return self._read(training_api().CheckpointState.load_checkpoint(str(self._bundle.path("checkpoint"))))

    def save(self, path: Path) -> None:
        training_api().CheckpointState.save_checkpoint(self._state, str(path),
                                                       include_optimizer_state=self._optimizer is not None)

    def _read(self, state) -> dict[str, np.ndarray]:
        return {name: np.array(state.parameters[name].data, dtype=np.float32) for name in self._names}
