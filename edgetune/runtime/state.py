"""The training state folder: crash-safe checkpoints and the per-step metrics file.

Layout (default ``<bundle>/train-state``)::

    LATEST                 name of the newest complete checkpoint (replaced atomically)
    ckpt-00000100/         one complete checkpoint
      checkpoint           ORT checkpoint: all parameters + AdamW moments + step
      adapter.safetensors  trainable tensors only (fast to read for eval/generate/delta)
      trainer.json         step, data position, seed, schedule, counters
    metrics.jsonl          one line per optimizer step

A checkpoint is written into a temporary folder, fsynced, renamed to ``ckpt-<step>``, and only
then does ``LATEST`` (written to a temp file, fsynced, renamed) point at it; the previous
checkpoint is deleted last. A kill or a full disk at any moment leaves the previous checkpoint
readable and ``LATEST`` pointing at a complete one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgetune.atomic import atomic_write_bytes, is_disk_full, replace_dir
from edgetune.errors import TrainingError

STATE_DIR = "train-state"
LATEST = "LATEST"
ADAPTER = "adapter.safetensors"
TRAINER = "trainer.json"
METRICS = "metrics.jsonl"


@dataclass
class Checkpoint:
    folder: Path
    trainer: dict  # step, position, ...

    @property
    def ort_checkpoint(self) -> Path:
        return self.folder / "checkpoint"

    def adapter(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return load_file(str(self.folder / ADAPTER))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class StateDir:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @property
    def metrics_path(self) -> Path:
        return self.folder / METRICS

    def latest(self) -> Checkpoint | None:
        pointer = self.folder / LATEST
        if not pointer.is_file():
            return None
        folder = self.folder / pointer.read_text().strip()
        try:
            trainer = json.loads((folder / TRAINER).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainingError(f"training state {folder} is unreadable ({exc}); pass --restart to start over.") from None
        return Checkpoint(folder, trainer)

    def save(self, trainer: dict, adapter: dict[str, np.ndarray], write_backend: Callable[[Path], None]) -> Checkpoint:
        """Write a complete checkpoint for ``trainer['step']`` and point LATEST at it."""
        from safetensors.numpy import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"ckpt-{int(trainer['step']):08d}"
        tmp = self.folder / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        previous = self.latest()
        try:
            tmp.mkdir()
            write_backend(tmp / "checkpoint")
            save_file({k: np.ascontiguousarray(v) for k, v in adapter.items()}, str(tmp / ADAPTER))
            (tmp / TRAINER).write_text(json.dumps(trainer, indent=2))
            # fsyncs tmp; the same step saved again (end of run right after a periodic save) is swapped in whole
            replace_dir(tmp, self.folder / name)
            atomic_write_text(self.folder / LATEST, name + "\n")
        except BaseException as exc:
            full = is_disk_full(exc, self.folder)  # asked before the partial checkpoint frees its space
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                kept = f"the checkpoint at step {previous.trainer['step']} is intact" if previous else "no earlier checkpoint exists"
                raise TrainingError(f"the disk is full while writing the checkpoint for step {trainer['step']} "
                                    f"in {self.folder}; {kept}. Free space and run again with --resume.") from None
            raise
        if previous is not None and previous.folder.name != name:
            shutil.rmtree(previous.folder, ignore_errors=True)
        return Checkpoint(self.folder / name, trainer)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # --- metrics -------------------------------------------------------------------------------
    def append_metrics(self, row: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric lines for steps after ``after_step`` (they are redone after a resume)."""
        if not self.metrics_path.is_file():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= after_step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by the kill
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))

