"""The training state folder: crash-safe checkpoints and the per-step metrics file.

Layout (default ``<bundle>/train-state``)::

    LATEST                 name of the newest complete checkpoint (replaced atomically)
    ckpt-00000100/         one complete checkpoint
      checkpoint           ORT checkpoint: all parameters + AdamW moments + step
      adapter.safetensors  trainable tensors only (fast to read for eval/generate/delta)
      trainer.json         step, data position, seed, schedule, counters, evaluation record
    BEST                   name of the best-evaluated adapter so far (train --eval-every)
    best-00000060/         adapter.safetensors + trainer.json (with the evaluation) of that step
    reference-<hash>.npy   cached reference log-probabilities of a data file (task dpo)
    metrics.jsonl          one line per optimizer step (and one per evaluation)
    edgetune-state.json    marker: this folder is an edgetune state folder

The folder may come from elsewhere (a copied bundle, a mistyped ``--state-dir``), so nothing in it
is obeyed blindly: ``LATEST`` must name a ``ckpt-NNNNNNNN`` folder directly inside (a real folder,
not a symlink), and a folder holding anything but the entries above (e.g. a home folder given as
``--state-dir``) is refused before anything is read, written or deleted. Folders written before the
marker existed are recognised by their layout (only LATEST, ckpt-*, metrics.jsonl and temp files).

A checkpoint is written into a temporary folder, fsynced, renamed to ``ckpt-<step>``, and only
then does ``LATEST`` (written to a temp file, fsynced, renamed) point at it; the previous
checkpoint is deleted last. A kill or a full disk at any moment leaves the previous checkpoint
readable and ``LATEST`` pointing at a complete one. ``best-<step>`` folders are written the same
way, then ``BEST`` points at one. A best folder is deleted only once a checkpoint records a later
best, so after a kill the best that the resumed checkpoint knows of still exists
(``rewind_best``) and a resumed run ends with the same ``BEST`` as an uninterrupted one.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgetune.atomic import atomic_write_bytes, fsync_dir, is_disk_full, replace_dir
from edgetune.errors import TrainingError

LATEST = "LATEST"
BEST = "BEST"
ADAPTER = "adapter.safetensors"
TRAINER = "trainer.json"
METRICS = "metrics.jsonl"
MARKER = "edgetune-state.json"
CHECKPOINT_NAME = re.compile(r"ckpt-\d{8}")
BEST_NAME = re.compile(r"best-\d{8}")
REFERENCE_NAME = re.compile(r"reference-[0-9a-f]{16}\.npy")
# Every entry edgetune writes into a state folder: the files above, checkpoints, and the temp names
# of checkpoints being written (".ckpt-N.partial"), of a checkpoint being swapped out
# (".ckpt-N.old-<ns>", edgetune.atomic.replace_dir), of atomic file replacements
# (".NAME.<random>.partial") and of the disk-full probe (".disk-probe.<random>").
OWN_ENTRY = re.compile(r"(LATEST|BEST|metrics\.jsonl|edgetune-state\.json|(ckpt|best)-\d{8}|reference-[0-9a-f]{16}\.npy"
                       r"|\.(ckpt|best)-\d{8}\.(partial|old-\d+)"
                       r"|\.(LATEST|BEST|metrics\.jsonl|edgetune-state\.json|reference-[0-9a-f]{16}\.npy)\.[^/]*\.partial"
                       r"|\.disk-probe\.[^/]*)")
RESTART_HINT = "start over with `edgetune train --restart` (it clears only edgetune's own files there)"


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


def foreign_entries(folder: Path) -> list[str]:
    """Entries of an existing ``folder`` that edgetune would not have written (symlinks included)."""
    return sorted(p.name for p in folder.iterdir() if p.is_symlink() or not OWN_ENTRY.fullmatch(p.name))


class StateDir:
    """A training state folder; refused at once when it exists and is not edgetune's."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        if self.folder.is_symlink() and not self.folder.exists():
            raise TrainingError(f"training state folder {str(self.folder)!r} is a dangling symlink; "
                                "give a new or empty folder with --state-dir.")
        if self.folder.exists():
            if not self.folder.is_dir():
                raise TrainingError(f"training state folder {str(self.folder)!r} is a file, not a folder; "
                                    "give a new or empty folder with --state-dir.")
            foreign = foreign_entries(self.folder)
            if foreign:
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                raise TrainingError(f"{str(self.folder)!r} is not an edgetune training state folder (it holds {shown}); "
                                    "edgetune neither uses nor deletes it — give a new or empty folder with --state-dir.")

    @property
    def metrics_path(self) -> Path:
        return self.folder / METRICS

    def _create(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = self.folder / MARKER
        if not marker.exists():
            atomic_write_text(marker, json.dumps({"format": "edgetune training state", "version": 1}) + "\n")

    def latest(self) -> Checkpoint | None:
        """The checkpoint ``LATEST`` names, or None when there is none; TrainingError if it is not
        a complete checkpoint folder directly inside this folder."""
        return self._pointed(LATEST, CHECKPOINT_NAME, (TRAINER, ADAPTER, "checkpoint"))

    def best(self) -> Checkpoint | None:
        """The best-evaluated adapter ``BEST`` names (train --eval-every), or None when there is none."""
        return self._pointed(BEST, BEST_NAME, (TRAINER, ADAPTER))

    def _pointed(self, pointer_name: str, pattern: re.Pattern, files: tuple[str, ...]) -> Checkpoint | None:
        pointer = self.folder / pointer_name
        if not pointer.exists():
            return None
        with open(pointer, "rb") as f:
            raw = f.read(64)
        name = raw.decode("utf-8", "replace").strip()
        kind = pattern.pattern.split("-")[0]
        if not pattern.fullmatch(name):
            raise TrainingError(f"{pointer} names {name[:40]!r}, not a checkpoint folder ({kind}-NNNNNNNN) inside "
                                f"{self.folder}; the state is damaged or not edgetune's — {RESTART_HINT}.")
        folder = self.folder / name
        if folder.is_symlink() or not folder.is_dir():
            raise TrainingError(f"{pointer} names {name}, which is {'a symlink' if folder.is_symlink() else 'missing'} "
                                f"in {self.folder}; the state is damaged — {RESTART_HINT}.")
        linked = [f for f in files if (folder / f).is_symlink()]
        if linked:
            raise TrainingError(f"checkpoint {folder} holds symlinks ({', '.join(linked)}) instead of its files; "
                                f"the state is not edgetune's — {RESTART_HINT}.")
        try:
            trainer = json.loads((folder / TRAINER).read_text())
            if not isinstance(trainer, dict) or not isinstance(trainer.get("step"), int) or trainer["step"] < 0:
                raise ValueError("no step count")
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise TrainingError(f"training state {folder} is unreadable ({exc}); {RESTART_HINT}.") from None
        return Checkpoint(folder, trainer)

    def save(self, trainer: dict, adapter: dict[str, np.ndarray], write_backend: Callable[[Path], None]) -> Checkpoint:
        """Write a complete checkpoint for ``trainer['step']`` and point LATEST at it."""
        from safetensors.numpy import save_file

        self._create()
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

    # --- cached reference log-probabilities (task dpo) -----------------------------------------
    def read_reference(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """The cached array ``reference-<key>.npy`` when it exists, has ``shape`` and is finite; else None."""
        path = self.folder / f"reference-{key}.npy"
        if path.is_symlink() or not path.is_file():
            return None
        try:
            values = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None  # damaged: recomputed
        ok = values.shape == shape and values.dtype == np.float64 and np.isfinite(values).all()
        return values if ok else None

    def write_reference(self, key: str, values: np.ndarray) -> None:
        import io

        self._create()
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(values, dtype=np.float64), allow_pickle=False)
        atomic_write_bytes(self.folder / f"reference-{key}.npy", buffer.getvalue())

    # --- the best-evaluated adapter ---------------------------------------------------------
    def save_best(self, trainer: dict, adapter: dict[str, np.ndarray]) -> Checkpoint:
        """Write ``best-<step>`` (adapter + trainer.json) and point BEST at it; older best folders
        stay until ``prune_best`` (after a checkpoint that records this best) removes them."""
        from safetensors.numpy import save_file

        self._create()
        name = f"best-{int(trainer['step']):08d}"
        tmp = self.folder / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            save_file({k: np.ascontiguousarray(v) for k, v in adapter.items()}, str(tmp / ADAPTER))
            (tmp / TRAINER).write_text(json.dumps(trainer, indent=2))
            replace_dir(tmp, self.folder / name)  # fsyncs tmp first
            atomic_write_text(self.folder / BEST, name + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Checkpoint(self.folder / name, trainer)

    def _best_steps(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(p.name[5:]) for p in self.folder.iterdir() if BEST_NAME.fullmatch(p.name))

    def prune_best(self, keep_step: int | None) -> None:
        """After a checkpoint recorded ``keep_step`` as its best: best folders before it are not needed."""
        for step in self._best_steps():
            if keep_step is not None and step < keep_step:
                shutil.rmtree(self.folder / f"best-{step:08d}", ignore_errors=True)

    def rewind_best(self, resumed_step: int, best_step: int | None) -> None:
        """On resume from ``resumed_step``: best folders the killed run wrote after it go, and BEST names
        the best that checkpoint recorded (``best_step``), or is removed when it recorded none."""
        for step in self._best_steps():
            if step > resumed_step:
                shutil.rmtree(self.folder / f"best-{step:08d}", ignore_errors=True)
        pointer = self.folder / BEST
        if best_step is not None and (self.folder / f"best-{best_step:08d}").is_dir():
            atomic_write_text(pointer, f"best-{best_step:08d}\n")
        elif pointer.exists():
            pointer.unlink()

    def clear(self) -> None:
        """Delete what edgetune wrote here (the constructor refused any folder holding other entries).

        Cached reference log-probabilities stay: they depend only on the data and the bundle (both
        in their key), not on the run.
        """
        if not self.folder.is_dir():
            return
        for child in self.folder.iterdir():
            if child.name == MARKER or REFERENCE_NAME.fullmatch(child.name) or not OWN_ENTRY.fullmatch(child.name):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        fsync_dir(self.folder)

    # --- metrics -------------------------------------------------------------------------------
    def append_metrics(self, row: dict) -> None:
        self._create()
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric lines for steps after ``after_step`` (they are redone after a resume)."""
        if not self.metrics_path.is_file():
            return
        if after_step <= 0:
            self.metrics_path.unlink()
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= after_step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by the kill
        atomic_write_text(self.metrics_path, "".join(k + "\n" for k in keep))

