"""The sync journal: where ``edgetune sync`` is in a round, so a kill at any moment is recoverable.

One small JSON file in the sync folder (default ``<bundle>/sync-state``, beside the training state
folder, which holds only the trainer's own files), replaced atomically at each phase change, plus
the round's files in ``rounds/``::

    {"server", "round", "update_id", "global_sha256", "phase", "delta_sha256", "answer", "reason"}

Phases, in order: ``pulled`` (global adapter saved and imported) -> ``trained`` -> ``written``
(update bytes on disk, their SHA-256 recorded) -> ``pushed`` (the server acknowledged) or
``refused`` (the server said no, with ``reason``). The update id is chosen when the round starts
and never changes for that round; once ``written``, only the recorded bytes are ever sent under it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from edgetune.atomic import atomic_write_bytes
from edgetune.errors import EdgetuneError

SYNC_STATE = "sync-state"  # default folder, inside the bundle folder like train-state
JOURNAL = "sync-journal.json"
ROUNDS_DIR = "rounds"
PHASES = ("pulled", "trained", "written", "pushed", "refused")


@dataclass
class Journal:
    server: str
    round: int
    update_id: str
    global_sha256: str
    phase: str = "pulled"
    delta_sha256: str | None = None
    answer: dict | None = None
    reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.phase in ("pushed", "refused")


class JournalFile:
    """The journal and the round files of one sync folder."""

    def __init__(self, folder: Path):
        self.state_dir = Path(folder)
        self.path = self.state_dir / JOURNAL
        self.files = self.state_dir / ROUNDS_DIR

    def load(self) -> Journal | None:
        if not self.path.is_file():
            return None
        try:
            data = json.loads(self.path.read_text())
            journal = Journal(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise EdgetuneError(f"{self.path} is unreadable ({exc}); delete it to start the round over "
                                "(an update already sent is then sent again under a new id and refused as a duplicate).") from None
        if journal.phase not in PHASES:
            raise EdgetuneError(f"{self.path}: unknown phase {journal.phase!r}; delete the file to start the round over.")
        return journal

    def save(self, journal: Journal) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, (json.dumps(asdict(journal), indent=2, sort_keys=True) + "\n").encode())

    def global_path(self, round_number: int) -> Path:
        return self.files / f"global-{round_number:06d}.etd"

    def update_path(self, round_number: int) -> Path:
        return self.files / f"update-{round_number:06d}.etd"

    def write_file(self, path: Path, data: bytes) -> str:
        """Write ``data`` atomically; returns its SHA-256."""
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        return hashlib.sha256(data).hexdigest()

    def read_update(self, journal: Journal) -> bytes:
        """The recorded update bytes; refuses a file that no longer matches the recorded SHA-256."""
        path = self.update_path(journal.round)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise EdgetuneError(f"{path}: the update of round {journal.round} is gone ({exc.strerror}); it cannot be "
                                f"re-sent under id {journal.update_id}. Delete {self.path} to start the round over.") from None
        if hashlib.sha256(data).hexdigest() != journal.delta_sha256:
            raise EdgetuneError(f"{path} changed since it was recorded (SHA-256 differs); refusing to send other bytes "
                                f"under update id {journal.update_id}. Delete {self.path} to start the round over.")
        return data

    def prune(self, keep_round: int) -> None:
        """Drop the files of earlier rounds (the journal only ever needs the current one)."""
        if not self.files.is_dir():
            return
        for path in self.files.glob("*.etd"):
            try:
                number = int(path.stem.rsplit("-", 1)[1])
            except (IndexError, ValueError):
                continue
            if number < keep_round:
                path.unlink(missing_ok=True)
