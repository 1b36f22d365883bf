"""The collector's logic without HTTP: authenticate, admit and store an upload; aggregate a round.

``server.py`` maps requests onto these methods; every refusal is an ``UpdateRefused`` that
``refuse`` records (with its reason) and turns into a status and a one-line JSON error.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np

from edgetune.errors import EdgetuneError
from edgetune.federated.admission import AdmissionPolicy, StoreSpec, UpdateRefused, admit_delta, full_adapter, parse_delta
from edgetune.federated.aggregate import AggregationOptions, ClientUpdate, aggregate
from edgetune.federated.privacy import epsilon_from_rho
from edgetune.federated.store import Device, Store, UpdateRow, now_iso

log = logging.getLogger("edgetune.collect")
DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Crash tests only: seconds to wait after the aggregate's blob is written and before its round is
# committed, so a test can kill the process inside aggregation. Unset in normal use.
PAUSE_ENV = "EDGETUNE_COLLECT_TEST_PAUSE_BEFORE_ROUND_COMMIT"
_RETRY_FAILED_AGGREGATION_S = 30.0


@dataclass(frozen=True)
class ServeOptions:
    min_updates: int = field(default=2, metadata={"help": "aggregate as soon as a round has this many updates"})
    min_at_deadline: int = field(default=1, metadata={"help": "after the deadline, aggregate with at least this many"})
    round_timeout: float | None = field(default=None, metadata={"help": "seconds from a round's opening to its deadline"})
    aggregation: AggregationOptions = field(default_factory=AggregationOptions)
    policy: AdmissionPolicy = field(default_factory=AdmissionPolicy)
    max_upload_bytes: int = field(default=32 << 20, metadata={"help": "refuse bodies larger than this (413)"})
    upload_timeout: float = field(default=60.0, metadata={"help": "seconds a client may take to send its body (408)"})

    def __post_init__(self) -> None:
        problems = []
        for name in ("min_updates", "min_at_deadline", "max_upload_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")
        for name in ("round_timeout", "upload_timeout"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                problems.append(f"--{name.replace('_', '-')} must be a positive number of seconds, got {value!r}")
        if problems:
            raise EdgetuneError("; ".join(problems) + ".")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Collector:
    def __init__(self, store: Store, options: ServeOptions):
        self.store, self.options = store, options
        self.spec = StoreSpec(store.meta("base_model_sha256"), store.meta("method"),
                              {k: tuple(v) for k, v in store.meta("layout").items()})
        agg = options.aggregation
        self.aggregation = AggregationOptions(agg.aggregator, agg.trim, store.meta("space"), store.meta("rank"), agg.dp)
        self._globals: dict[int, tuple[dict[str, np.ndarray], str]] = {}
        self._failed_at: float | None = None
        # Admitted uploads whose blob is being written: the round cannot close under them.
        self._reserved_ids: set[str] = set()
        self._reserved_devices: set[str] = set()
        self._settled = threading.Condition(store.lock)
        self._closing = False
        self.last_error: str | None = None

    # --- globals ------------------------------------------------------------------------------------
    def global_of(self, n: int) -> tuple[dict[str, np.ndarray], str]:
        """Round n's global adapter (PEFT key -> float32) and its delta checksum; cached."""
        if n not in self._globals:
            from edgetune.delta import read_delta

            row = self.store.round(n)
            delta = read_delta(self.store.read_blob(row.global_blob))
            self._globals[n] = (delta.tensors, delta.sha256)
            for old in sorted(self._globals)[:-(self.options.policy.max_late + 2)]:
                del self._globals[old]
        return self._globals[n]

    def global_bytes(self, n: int) -> bytes:
        row = self.store.round(n)
        if row is None:
            raise UpdateRefused(404, "no_such_round", f"round {n} does not exist; GET /v1/round names the current one.")
        return self.store.read_blob(row.global_blob)

    def deadline(self, opened_at: str) -> str | None:
        if self.options.round_timeout is None:
            return None
        opened = datetime.fromisoformat(opened_at)
        return (opened + timedelta(seconds=self.options.round_timeout)).isoformat(timespec="milliseconds")

    def round_info(self) -> dict:
        current = self.store.current_round()
        return {"round": current.round, "base_model_sha256": self.spec.base_model_sha256, "method": self.spec.method,
                "global_sha256": current.global_sha256, "min_updates": self.options.min_updates,
                "deadline": self.deadline(current.opened_at), "accepted": self.store.count_for(current.round),
                "global_url": f"/v1/rounds/{current.round}/global"}

    # --- uploads ------------------------------------------------------------------------------------
    def authenticate(self, device_id: str | None, update_id: str | None, authorization: str | None) -> Device:
        """The device, when the headers name a known device and carry its token (or it signs by key)."""
        if not device_id or not DEVICE_ID.fullmatch(device_id):
            raise UpdateRefused(400, "bad_headers", "header X-Edgetune-Device must name the device (letters, digits, "
                                                    "._:- ; at most 128 characters).")
        if not update_id or not _is_uuid(update_id):
            raise UpdateRefused(400, "bad_headers", "header X-Edgetune-Update-Id must be a UUID chosen by the device "
                                                    "for this update (the same on every retry).")
        device = self.store.device(device_id)
        if device is None:
            raise UpdateRefused(403, "unknown_device", f"device {device_id!r} is not registered here; register it with "
                                                       "`edgetune collect devices add`.")
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise UpdateRefused(401, "bad_token", "header Authorization must be `Bearer <token>`.")
            if device.token_sha256 is None or not hmac.compare_digest(token_hash(token.strip()), device.token_sha256):
                raise UpdateRefused(401, "bad_token", f"wrong token for device {device_id!r}; use the token "
                                                      "`collect devices add` printed for it.")
        elif device.public_key is None:
            raise UpdateRefused(401, "no_credentials", f"device {device_id!r} must send `Authorization: Bearer <token>`.")
        return device

    def upload(self, device: Device, update_id: str, claimed_round: int, body: bytes,
               by_key: bool) -> tuple[int, dict]:
        """(201, answer) for a new admitted update; (200, the first answer) for an exact retry."""
        digest = hashlib.sha256(body).hexdigest()
        earlier = self._retry(device, update_id, digest)
        if earlier is not None:
            return 200, earlier
        key = _public_key(device.public_key) if by_key else None
        delta = parse_delta(body, key)  # outside the lock: the costly checksum, signature and decoding
        with self.store.lock:
            if not self._settled.wait_for(lambda: not self._closing, timeout=120):
                raise UpdateRefused(503, "busy", "the round is being aggregated; retry in a moment.")
            earlier = self._retry(device, update_id, digest)  # a concurrent retry may have landed meanwhile
            if earlier is not None:
                return 200, earlier
            if update_id in self._reserved_ids:
                raise UpdateRefused(409, "upload_in_progress", f"update {update_id} is being stored right now; "
                                                               "retry in a moment to get its answer.")
            current = self.store.current_round().round
            admitted = admit_delta(delta, claimed_round=claimed_round, current_round=current, spec=self.spec,
                                   policy=self.options.policy, global_of=self.global_of)
            if (self.store.has_device_update(device.device_id, claimed_round, current)
                    or device.device_id in self._reserved_devices):
                raise UpdateRefused(409, "one_per_round", f"device {device.device_id!r} already has an update for "
                                                          f"round {claimed_round} or in round {current}; one per round.")
            self._reserved_ids.add(update_id)  # until committed: aggregation waits, duplicates are refused
            self._reserved_devices.add(device.device_id)
        answer = {"update_id": update_id, "round": claimed_round, "status": "accepted",
                  "weight": admitted.update.weight, "aggregated_into": current, "late": admitted.lateness,
                  "clipped": admitted.clipped}
        try:
            self.store.put_blob(body)  # fsyncs outside the lock, so uploads store their blobs in parallel
            self.store.add_update(UpdateRow(update_id, device.device_id, claimed_round, current, digest, now_iso(),
                                            admitted.num_examples, admitted.update.weight, admitted.norm,
                                            admitted.scale, admitted.lateness, admitted.loss, answer))
        finally:
            with self._settled:
                self._reserved_ids.discard(update_id)
                self._reserved_devices.discard(device.device_id)
                self._settled.notify_all()
        return 201, answer

    def _retry(self, device: Device, update_id: str, digest: str) -> dict | None:
        row = self.store.update(update_id)
        if row is None:
            return None
        if row.device_id != device.device_id or row.blob != digest:
            raise UpdateRefused(409, "update_id_conflict", f"update id {update_id} was already used for other bytes; "
                                                           "a new update needs a new id.")
        return row.answer

    def refuse(self, exc: UpdateRefused, *, device_id=None, update_id=None, round_=None) -> tuple[int, dict]:
        self.store.record_refusal(device_id=device_id, update_id=update_id, round_=round_, status=exc.status,
                                  reason=exc.reason, message=str(exc))
        return exc.status, {"error": " ".join(str(exc).split()), "reason": exc.reason}

    # --- aggregation ----------------------------------------------------------------------------------
    def aggregate_if_due(self) -> int | None:
        """Aggregate the open round when it has enough updates (or its deadline passed); the new round."""
        if self._failed_at is not None and time.monotonic() - self._failed_at < _RETRY_FAILED_AGGREGATION_S:
            return None
        with self.store.lock:
            if self._trigger(len(self._reserved_ids)) is None:
                return None
            self._closing = True  # new uploads wait; the admitted ones in flight are committed first
            try:
                if not self._settled.wait_for(lambda: not self._reserved_ids, timeout=60):
                    return None  # an upload is stuck writing its blob; try again at the next check
                current = self.store.current_round()
                trigger = self._trigger(0)
                if trigger is None:
                    return None
                try:
                    self._aggregate(current, trigger)
                except Exception as exc:  # the round stays open with every update; retried later
                    self._failed_at, self.last_error = time.monotonic(), f"round {current.round}: {exc}"
                    log.exception("aggregation of round %s failed; it stays open", current.round)
                    return None
                self._failed_at = self.last_error = None
                return current.round + 1
            finally:
                self._closing = False
                self._settled.notify_all()

    def _trigger(self, in_flight: int) -> str | None:
        """Why the open round is due (with ``in_flight`` more updates), or None. Call under the lock."""
        current = self.store.current_round()
        count = self.store.count_for(current.round) + in_flight
        deadline = self.deadline(current.opened_at)
        passed = deadline is not None and datetime.now(timezone.utc) >= datetime.fromisoformat(deadline)
        if count >= self.options.min_updates:
            return "min_updates"
        if passed and count >= self.options.min_at_deadline:
            return "deadline"
        return None

    def _aggregate(self, current, trigger: str) -> None:
        from edgetune.delta import encode_delta, read_delta

        rows = self.store.updates_for(current.round)
        tensors, _ = self.global_of(current.round)
        updates = [self._client_update(row) for row in rows]
        result = aggregate(tensors, updates, self.aggregation)
        report = {**result.report, "trigger": trigger, "update_ids": [r.update_id for r in rows],
                  "devices": [r.device_id for r in rows], "examples": sum(r.num_examples for r in rows),
                  "late": sum(r.lateness > 0 for r in rows), "clipped": sum(r.scale != 1.0 for r in rows),
                  "norm_mean": float(np.mean([r.norm for r in rows])), "loss": _weighted_loss(rows)}
        if "dp" in report:
            report["dp"]["rho_round"] = 1.0 / (2.0 * report["dp"]["noise_multiplier"] ** 2)
            rho = report["dp"]["rho_round"] + sum((r.report or {}).get("dp", {}).get("rho_round", 0.0)
                                                  for r in self.store.rounds() if r.closed_at)
            report["dp"]["epsilon_total"] = epsilon_from_rho(rho, report["dp"]["delta"])
        metrics = {"loss": report["loss"]} if report["loss"] is not None else {}
        data = encode_delta(result.tensors, base_model_sha256=self.spec.base_model_sha256, method=self.spec.method,
                            codec="fp32", num_examples=report["examples"], round_id=str(current.round + 1),
                            metrics=metrics, producer={"collector_round": str(current.round)})
        checksum = read_delta(data).sha256
        blob = self.store.put_blob(data)
        pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
        if pause > 0:
            time.sleep(pause)
        self.store.close_round(current.round, report, blob, checksum)
        self._globals[current.round + 1] = (result.tensors, checksum)
        log.info("round %s aggregated (%s updates, %s): round %s is open", current.round, len(rows), trigger,
                 current.round + 1)

    def _client_update(self, row: UpdateRow) -> ClientUpdate:
        from edgetune.delta import read_delta

        start, start_sha = self.global_of(row.round)
        adapter = full_adapter(read_delta(self.store.read_blob(row.blob)), start, start_sha)
        if row.scale != 1.0:  # clipped at admission: the same factor again
            adapter = {k: (start[k] + (adapter[k].astype(np.float64) - start[k]) * row.scale).astype(np.float32)
                       for k in start}
        return ClientUpdate(adapter, start, row.weight)


def _weighted_loss(rows: list[UpdateRow]) -> float | None:
    pairs = [(r.weight, r.loss) for r in rows if r.loss is not None]
    total = sum(w for w, _ in pairs)
    return sum(w * x for w, x in pairs) / total if pairs and total > 0 else None


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
        return len(text) in (32, 36)
    except ValueError:
        return False


def _public_key(hex_key: str):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))
