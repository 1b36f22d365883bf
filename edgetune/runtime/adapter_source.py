"""Which adapter tensors eval, generate and delta use: the latest trained ones, or the bundle's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgetune.bundle import Manifest
from edgetune.errors import BundleError, EdgetuneError
from edgetune.runtime.backend import AUTO, open_backend
from edgetune.runtime.state import StateDir

if TYPE_CHECKING:
    from edgetune.bundle import Bundle


@dataclass
class AdapterTensors:
    tensors: dict[str, np.ndarray]  # graph name -> float32 array
    origin: str  # human description: "trained, step 200" / "bundle's initial adapter"
    step: int = 0
    trainer: dict | None = None


CHECKPOINTS = ("latest", "best")


def latest_adapter(bundle: "Bundle", state_dir: Path | None = None, backend: str = AUTO,
                   checkpoint: str = "latest") -> AdapterTensors:
    """The newest checkpoint's adapter, or the bundle's initial one when nothing was trained.

    ``checkpoint="best"``: the best adapter by the held-out metric (train --eval-data --eval-every);
    refused when the run kept none.
    """
    state = StateDir(bundle.state_folder(state_dir))
    if checkpoint not in CHECKPOINTS:
        raise EdgetuneError(f"unknown --checkpoint {checkpoint!r}; choose latest or best.")
    if checkpoint == "best":
        best = state.best()
        if best is None:
            raise EdgetuneError(f"--checkpoint best: {state.folder} holds no best checkpoint; train with "
                                "--eval-data FILE --eval-every N to keep one, or use --checkpoint latest.")
        step = int(best.trainer["step"])
        return AdapterTensors(best.adapter(), best.trainer.get("origin") or f"trained, step {step} (best)", step, best.trainer)
    latest = state.latest()
    if latest is not None:
        step = int(latest.trainer.get("step", 0))
        origin = latest.trainer.get("origin") or f"trained, step {step}"
        return AdapterTensors(latest.adapter(), origin, step, latest.trainer)
    return AdapterTensors(initial_adapter(bundle, backend), "bundle's initial adapter")


def initial_adapter(bundle: "Bundle", backend: str = AUTO) -> dict[str, np.ndarray]:
    """The trainable tensors as exported (graph name -> array), read by ``backend`` from the bundle.

    With ``AUTO`` they are read straight from the checkpoint file (memory-mapped, only these
    tensors): the training build's ``CheckpointState`` would load every frozen weight too (137 MB
    for SmolLM2-135M int8), which ``generate`` on a fresh bundle then carried as peak memory.
    Both read the same bytes."""
    if backend == AUTO:
        from edgetune.runtime.ort_checkpoint import read_trainable

        return read_trainable(bundle.path("checkpoint"), [t.graph_name for t in bundle.manifest.trainable]).params
    return open_backend(backend, bundle, training=False).initial_adapter()


def check_adapter(manifest: Manifest, adapter: dict[str, np.ndarray]) -> None:
    """Refuse an adapter (graph name -> array) that misses a tensor or has a wrong shape; all problems at once."""
    problems = []
    for t in manifest.trainable:
        if t.graph_name not in adapter:
            problems.append(f"{t.graph_name} is missing")
        elif np.shape(adapter[t.graph_name]) != tuple(t.shape):
            problems.append(f"{t.graph_name} has shape {np.shape(adapter[t.graph_name])}, the bundle expects {tuple(t.shape)}")
    if problems:
        raise BundleError(f"the adapter does not fit this bundle: {'; '.join(problems)}. Use an adapter trained for it.")


def disabled(bundle: "Bundle", adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Tensors that switch ``adapter`` off, as the bundle's method defines it (LoRA: B = 0, A kept;
    full fine-tuning: the weights as exported, read from the bundle only then); a task head
    (sequence-classification) goes back to its exported values."""
    from edgetune.methods import get_method
    from edgetune.methods.base import head_tensors

    manifest = bundle.manifest
    off = get_method(manifest.method["name"]).adapter_off(manifest, adapter, lambda: initial_adapter(bundle))
    head = head_tensors(manifest)
    if head:  # a task head (classifier) as exported: "off" is the bundle before any training
        initial = initial_adapter(bundle)
        off.update({name: initial[name] for name in head})
    return off
