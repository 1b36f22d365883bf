"""ONNX Runtime training artifacts: training, eval and optimizer models plus the checkpoint.

``generate_artifacts`` builds the gradient graph for the declared trainable tensors only; every
other initializer goes into the checkpoint as a frozen parameter, so the training and eval
sessions share one copy of the base weights instead of each holding its own.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

# File names inside a bundle (what ORT's on-device APIs on Android, iOS and Linux consume).
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class AdamWSettings:
    """AdamW with PyTorch's semantics (``torch.optim.AdamW``); the learning rate is set per step."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def to_dict(self) -> dict:
        return {"name": "adamw", "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay,
                "semantics": "torch.optim.AdamW"}


def _torch_adamw(settings: AdamWSettings):
    """onnxblock's AdamW with ``adam_mode=0`` (PyTorch) instead of its default 1 (Hugging Face).

    The two differ in where epsilon enters the denominator; mode 0 makes an exported step equal
    to ``torch.optim.AdamW``'s, which the parity tests check.
    """
    from onnxruntime.training import onnxblock

    class _Node(onnxblock.optim.optim.AdamWOptimizer):
        def build(self, lr, step, params, grads, m1, m2):
            attrs = {"alpha": self._betas[0], "beta": self._betas[1], "epsilon": self._eps,
                     "weight_decay": self._weight_decay, "correct_bias": 1, "adam_mode": 0}
            return self._build_optimizer_node([lr, step, params, grads, m1, m2],
                                              onnxblock.optim.optim._graph_utils.generate_graph_name("adamw.updated_flag"),
                                              "AdamWOptimizer", attrs)

    block = onnxblock.optim.AdamW()
    block._adamw = _Node(betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay)
    return block


def generate(model: onnx.ModelProto, trainable: list[str], frozen: list[str], out_dir: Path,
             adamw: AdamWSettings) -> None:
    """Write the four artifacts into ``out_dir`` (which must exist)."""
    from onnxruntime.training import artifacts

    with _native_stderr_captured():
        artifacts.generate_artifacts(
            model,
            requires_grad=trainable,
            frozen_params=frozen,
            loss=None,  # the graph already outputs its scalar loss
            optimizer=_torch_adamw(adamw),
            artifact_directory=str(out_dir),
        )


@contextlib.contextmanager
def _native_stderr_captured():
    """ORT's gradient builder logs every graph transformer at INFO level straight to fd 2, ignoring
    the Python-side severity; keep it out of the user's terminal, and show it only on failure."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
