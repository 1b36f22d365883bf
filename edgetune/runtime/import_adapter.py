"""Start on-device training from an adapter trained elsewhere (``edgetune from-peft``).

The adapter becomes a step-0 checkpoint in the training state folder (fresh AdamW moments), so the
next ``edgetune train`` starts from it and ``eval``/``generate``/``delta`` use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgetune.errors import EdgetuneError
from edgetune.runtime.backend import AUTO, open_backend
from edgetune.runtime.state import StateDir

if TYPE_CHECKING:
    from edgetune.bundle import Bundle


def import_adapter(bundle: "Bundle", tensors: dict[str, np.ndarray], origin: str, *, state_dir: Path | None = None,
                   force: bool = False, backend: str = AUTO) -> Path:
    """``tensors`` by graph name (already validated). Returns the checkpoint folder.

    The checkpoint is written by ``backend`` (``auto``: as ``train`` chooses by default), which is
    recorded in it.
    """
    state = StateDir(bundle.state_folder(state_dir))
    latest = state.latest()
    if latest is not None and latest.trainer.get("step", 0) > 0 and not force:
        raise EdgetuneError(f"{state.folder} holds a training run at step {latest.trainer['step']}; "
                            "pass --force to replace it with the imported adapter.")
    engine = open_backend(backend, bundle)
    engine.set_trainable(tensors)
    if state.metrics_path.exists():
        state.metrics_path.unlink()
    trainer = {"step": 0, "position": None, "origin": origin, "base_model_sha256": bundle.manifest.base_sha256,
               "num_examples": 0, "backend": engine.name}
    return state.save(trainer, engine.trainable(), engine.save).folder
