"""Start on-device training from an adapter trained elsewhere (``edgetune from-peft``).

The adapter becomes a step-0 checkpoint in the training state folder (fresh AdamW moments), so the
next ``edgetune train`` starts from it and ``eval``/``generate``/``delta`` use it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgetune.bundle import Bundle
from edgetune.errors import EdgetuneError
from edgetune.runtime.backend import open_backend
from edgetune.runtime.state import StateDir


def import_adapter(bundle: Bundle, tensors: dict[str, np.ndarray], origin: str, *,
                   state_dir: Path | None = None, force: bool = False) -> Path:
    """``tensors`` by graph name (already validated). Returns the checkpoint folder."""
    state = StateDir(bundle.state_folder(state_dir))
    latest = state.latest()
    if latest is not None and latest.trainer.get("step", 0) > 0 and not force:
        raise EdgetuneError(f"{state.folder} holds a training run at step {latest.trainer['step']}; "
                            "pass --force to replace it with the imported adapter.")
    backend = open_backend("ort-training", bundle)
    backend.set_trainable(tensors)
    if state.metrics_path.exists():
        state.metrics_path.unlink()
    trainer = {"step": 0, "position": None, "origin": origin, "base_model_sha256": bundle.manifest.base_sha256,
               "num_examples": 0, "backend": backend.name}
    return state.save(trainer, backend.trainable(), backend.save).folder
