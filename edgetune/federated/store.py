"""The collector's durable store: one folder with a SQLite database (WAL) and content-addressed blobs.

    STORE/collector.sqlite   rounds, devices, updates, refusals, and the store's spec (meta)
    STORE/blobs/<sha256>.etd every uploaded delta and every global adapter, named by the SHA-256 of
                             its bytes, written with ``edgetune.atomic`` (temp file, fsync, rename,
                             fsync folder) before the row that names it is committed

Durability: ``synchronous=FULL`` makes every commit fsync the WAL, so a committed row survives a
power cut, and a blob is on disk before its row exists. A crash between the two leaves an
unreferenced blob (harmless; nothing names it). Closing a round and opening the next, with the
aggregate's blob, is one transaction. One connection is shared by the server's threads under
``self.lock``; callers that read-then-write hold the lock across both.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edgetune.atomic import atomic_write_bytes, fsync_dir
from edgetune.errors import EdgetuneError

DATABASE = "collector.sqlite"
BLOBS = "blobs"
SCHEMA_VERSION = 1
_KEEP_REFUSALS = 10_000  # newest refusal rows kept; per-reason counts are kept forever

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY, opened_at TEXT NOT NULL, global_blob TEXT NOT NULL, global_sha256 TEXT NOT NULL,
    closed_at TEXT, report TEXT);
CREATE TABLE devices (
    device_id TEXT PRIMARY KEY, token_sha256 TEXT, public_key TEXT, added_at TEXT NOT NULL);
CREATE TABLE updates (
    update_id TEXT PRIMARY KEY, device_id TEXT NOT NULL REFERENCES devices(device_id),
    round INTEGER NOT NULL, target_round INTEGER NOT NULL REFERENCES rounds(round), blob TEXT NOT NULL,
    received_at TEXT NOT NULL, num_examples INTEGER NOT NULL, weight REAL NOT NULL, norm REAL NOT NULL,
    scale REAL NOT NULL, lateness INTEGER NOT NULL, loss REAL, answer TEXT NOT NULL,
    UNIQUE (device_id, round), UNIQUE (device_id, target_round));
CREATE INDEX updates_by_target ON updates (target_round);
CREATE TABLE refusals (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, device_id TEXT, update_id TEXT, round INTEGER,
    status INTEGER NOT NULL, reason TEXT NOT NULL, message TEXT NOT NULL);
CREATE TABLE refusal_counts (reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
"""


class StoreError(EdgetuneError):
    """The store folder is missing, not a collector store, or already initialised."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Round:
    round: int
    opened_at: str
    global_blob: str  # SHA-256 of the global adapter's file bytes (its blob name)
    global_sha256: str  # the global delta's checksum: what a diff's since_sha256 names
    closed_at: str | None
    report: dict | None


@dataclass
class Device:
    device_id: str
    token_sha256: str | None
    public_key: str | None  # 64 hex digits of the raw Ed25519 key
    added_at: str


@dataclass
class UpdateRow:
    update_id: str
    device_id: str
    round: int  # the round it was trained for
    target_round: int  # the round it is aggregated into
    blob: str
    received_at: str
    num_examples: int
    weight: float
    norm: float
    scale: float  # 1.0, or max_norm / norm when the change was clipped
    lateness: int
    loss: float | None
    answer: dict


class Store:
    """An initialised store folder. ``Store.create`` makes one; ``Store(folder)`` opens one."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        path = self.folder / DATABASE
        if not path.is_file():
            raise StoreError(f"{self.folder} is not a collector store (no {DATABASE}); create it with "
                             "`edgetune collect init --bundle BUNDLE --store FOLDER`.")
        self.db = _connect(path)
        self.lock = threading.RLock()
        try:
            version = self.meta("schema_version")
        except (sqlite3.DatabaseError, StoreError) as exc:
            raise StoreError(f"{path} is not a readable collector database ({exc}).") from None
        if version != SCHEMA_VERSION:
            raise StoreError(f"{path}: store schema {version!r} is not supported (this edgetune knows {SCHEMA_VERSION}).")

    @classmethod
    def create(cls, folder: Path | str, meta: dict, initial_global: bytes, initial_checksum: str) -> "Store":
        """A new store whose round 0 global adapter is ``initial_global`` (delta bytes).

        Built in a temporary sibling folder and renamed into place: an interrupted init leaves no
        half store under ``folder``.
        """
        folder = Path(folder)
        if (folder / DATABASE).exists():
            raise StoreError(f"{folder} already holds a collector store; choose another --store or remove it.")
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise StoreError(f"{folder} exists and is not an empty folder; give a new or empty folder as --store.")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".init", dir=folder.parent))
        try:
            (tmp / BLOBS).mkdir()
            blob = _put_blob(tmp, initial_global)
            db = _connect(tmp / DATABASE)
            db.executescript("BEGIN;" + _SCHEMA + "COMMIT;")
            with db:
                rows = [("schema_version", SCHEMA_VERSION), *meta.items()]
                db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in rows])
                db.execute("INSERT INTO rounds (round, opened_at, global_blob, global_sha256) VALUES (0, ?, ?, ?)",
                           (now_iso(), blob, initial_checksum))
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.close()
            fsync_dir(tmp)
            if folder.exists():
                folder.rmdir()  # empty, checked above
            os.rename(tmp, folder)
            tmp = None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(folder.parent)
        return cls(folder)

    def _q(self, sql: str, params: tuple = ()) -> list[tuple]:
        """A read under the lock: another thread's open transaction is never seen half done."""
        with self.lock:
            return self.db.execute(sql, params).fetchall()

    def _q1(self, sql: str, params: tuple = ()) -> tuple | None:
        rows = self._q(sql, params)
        return rows[0] if rows else None

    # --- meta and blobs -------------------------------------------------------------------------
    def meta(self, key: str):
        row = self._q1("SELECT value FROM meta WHERE key = ?", (key,))
        if row is None:
            raise StoreError(f"{self.folder}: the store has no {key!r}; it was not made by `edgetune collect init`.")
        return json.loads(row[0])

    def put_blob(self, data: bytes) -> str:
        return _put_blob(self.folder, data)

    def blob_path(self, name: str) -> Path:
        return self.folder / BLOBS / f"{name}.etd"

    def read_blob(self, name: str) -> bytes:
        return self.blob_path(name).read_bytes()

    # --- rounds -----------------------------------------------------------------------------------
    def current_round(self) -> Round:
        row = self._q1("SELECT * FROM rounds WHERE closed_at IS NULL ORDER BY round DESC LIMIT 1")
        if row is None:
            raise StoreError(f"{self.folder}: no open round; the store is damaged.")
        return _round(row)

    def round(self, n: int) -> Round | None:
        row = self._q1("SELECT * FROM rounds WHERE round = ?", (n,))
        return _round(row) if row else None

    def rounds(self) -> list[Round]:
        return [_round(r) for r in self._q("SELECT * FROM rounds ORDER BY round")]

    def close_round(self, n: int, report: dict, next_blob: str, next_checksum: str) -> None:
        """Close round ``n`` with ``report`` and open ``n + 1`` with the aggregate, in one transaction."""
        with self.lock, self.db:
            done = self.db.execute("UPDATE rounds SET closed_at = ?, report = ? WHERE round = ? AND closed_at IS NULL",
                                   (now_iso(), json.dumps(report), n)).rowcount
            if done != 1:
                raise StoreError(f"round {n} is not the open round; it was aggregated already.")
            self.db.execute("INSERT INTO rounds (round, opened_at, global_blob, global_sha256) VALUES (?, ?, ?, ?)",
                            (n + 1, now_iso(), next_blob, next_checksum))

    # --- devices ----------------------------------------------------------------------------------
    def add_device(self, device_id: str, token_sha256: str | None, public_key_hex: str | None) -> None:
        try:
            with self.lock, self.db:
                self.db.execute("INSERT INTO devices VALUES (?, ?, ?, ?)", (device_id, token_sha256, public_key_hex,
                                                                            now_iso()))
        except sqlite3.IntegrityError:
            raise StoreError(f"device {device_id!r} is already registered in {self.folder}; choose another id.") from None

    def device(self, device_id: str) -> Device | None:
        row = self._q1("SELECT * FROM devices WHERE device_id = ?", (device_id,))
        return Device(*row) if row else None

    def device_count(self) -> int:
        return self._q1("SELECT COUNT(*) FROM devices")[0]

    # --- updates ------------------------------------------------------------------------------------
    def update(self, update_id: str) -> UpdateRow | None:
        row = self._q1("SELECT * FROM updates WHERE update_id = ?", (update_id,))
        return _update(row) if row else None

    def updates_for(self, target_round: int) -> list[UpdateRow]:
        rows = self._q("SELECT * FROM updates WHERE target_round = ? ORDER BY received_at, update_id",
                               (target_round,))
        return [_update(r) for r in rows]

    def count_for(self, target_round: int) -> int:
        return self._q1("SELECT COUNT(*) FROM updates WHERE target_round = ?", (target_round,))[0]

    def has_device_update(self, device_id: str, round_: int, target_round: int) -> bool:
        row = self._q1("SELECT 1 FROM updates WHERE device_id = ? AND (round = ? OR target_round = ?)",
                              (device_id, round_, target_round))
        return row is not None

    def add_update(self, row: UpdateRow, data: bytes | None = None) -> None:
        """Write the blob (fsynced) unless stored already (``data`` None), then commit the row."""
        if data is not None and self.put_blob(data) != row.blob:
            raise StoreError("internal: the update's blob name is not the SHA-256 of its bytes.")
        if not self.blob_path(row.blob).is_file():
            raise StoreError(f"internal: blob {row.blob} must be stored before its update row.")
        with self.lock, self.db:
            self.db.execute("INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (row.update_id, row.device_id, row.round, row.target_round, row.blob, row.received_at,
                             row.num_examples, row.weight, row.norm, row.scale, row.lateness, row.loss,
                             json.dumps(row.answer)))

    def accepted_by_round(self) -> dict[int, tuple[int, int]]:
        """target round -> (updates, examples)."""
        rows = self._q("SELECT target_round, COUNT(*), SUM(num_examples) FROM updates GROUP BY target_round")
        return {r: (n, e) for r, n, e in rows}

    def all_updates(self) -> list[UpdateRow]:
        return [_update(r) for r in self._q("SELECT * FROM updates ORDER BY target_round, received_at")]

    # --- refusals -----------------------------------------------------------------------------------
    def record_refusal(self, *, device_id, update_id, round_, status: int, reason: str, message: str) -> None:
        with self.lock, self.db:
            self.db.execute("INSERT INTO refusals (at, device_id, update_id, round, status, reason, message) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)", (now_iso(), _clip(device_id), _clip(update_id), round_,
                                                             status, reason, _clip(message, 500)))
            self.db.execute("INSERT INTO refusal_counts VALUES (?, 1) ON CONFLICT(reason) DO UPDATE SET count = count + 1",
                            (reason,))
            self.db.execute("DELETE FROM refusals WHERE id <= (SELECT MAX(id) FROM refusals) - ?", (_KEEP_REFUSALS,))

    def refusal_counts(self) -> dict[str, int]:
        return dict(self._q("SELECT reason, count FROM refusal_counts ORDER BY count DESC, reason"))

    def recent_refusals(self, limit: int = 20) -> list[dict]:
        rows = self._q("SELECT at, device_id, update_id, round, status, reason, message FROM refusals "
                               "ORDER BY id DESC LIMIT ?", (limit,))
        keys = ("at", "device_id", "update_id", "round", "status", "reason", "message")
        return [dict(zip(keys, r)) for r in rows]

    def lock_for_serving(self) -> None:
        """Refuse a second ``collect serve`` on this store (its admission state lives in one process).

        An advisory lock on STORE/serve.lock, held until the process ends (a killed process drops it).
        """
        try:
            import fcntl
        except ImportError:  # not POSIX: no exclusive serving check
            return
        self._serve_lock = open(self.folder / "serve.lock", "a+")
        try:
            fcntl.flock(self._serve_lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._serve_lock.close()
            raise StoreError(f"{self.folder} is already being served by another `edgetune collect serve`; stop it "
                             "first (one server per store).") from None

    def close(self) -> None:
        self.db.close()


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; ``with db`` and BEGIN/COMMIT are explicit.
    db = sqlite3.connect(str(path), timeout=30, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    return _Transactional(db)


class _Transactional:
    """A connection whose ``with`` block is BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error)."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __getattr__(self, name):
        return getattr(self._db, name)

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, kind, value, tb):
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _put_blob(folder: Path, data: bytes) -> str:
    name = _sha256(data)
    path = folder / BLOBS / f"{name}.etd"
    if not (path.is_file() and path.stat().st_size == len(data) and _sha256(path.read_bytes()) == name):
        atomic_write_bytes(path, data)  # absent, or damaged: (re)write it whole
    return name


def _clip(value, n: int = 200):
    return value[:n] if isinstance(value, str) else value


def _round(row) -> Round:
    return Round(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]) if row[5] else None)


def _update(row) -> UpdateRow:
    return UpdateRow(*row[:12], answer=json.loads(row[12]))
