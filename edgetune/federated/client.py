"""HTTP client for the collector, the device side of ``edgetune sync``.

Built on ``urllib.request`` from the standard library rather than httpx: the device install stays
what ``edgetune train`` already needs (no HTTP stack, no h11/anyio/certifi), and a device makes
a handful of sequential requests per round, so connection pooling and async buy nothing here.

The collector's contract (``edgetune collect serve``):
  GET  /v1/round                 -> {"round", "base_model_sha256", "method", "global_sha256", "min_updates",
                                     "deadline", "accepted"}
  GET  /v1/rounds/{n}/global     -> the round's global adapter, a full .etd delta
  POST /v1/rounds/{n}/updates    -> 201 {"update_id", "round", "status", "weight"}; the same update id with
                                     the same bytes -> 200 and the first answer; with other bytes -> 409
  GET  /v1/status                -> JSON
Errors are JSON ``{"error": "..."}``. Connection failures, 5xx, 429 and 503 are worth retrying (the
upload is idempotent by update id); any other 4xx is a refusal and retrying cannot change it.
"""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Callable

from edgetune.errors import EdgetuneError

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_BODY = 1 << 30  # refuse to buffer more than 1 GiB from a server (a LoRA global is a few MB)


class CollectorError(EdgetuneError):
    """The collector refused a request (4xx) or could not be reached after every retry."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off with full jitter: attempt k waits uniform(0, min(cap, base * 2**k)) seconds.

    Bounded two ways: at most ``attempts`` tries and at most ``budget`` seconds of waiting in all.
    Full jitter spreads a fleet that failed together over the whole window instead of retrying in step.
    """

    attempts: int = 6
    base: float = 0.5
    cap: float = 30.0
    budget: float = 120.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base < 0 or self.cap < 0 or self.budget < 0:
            raise EdgetuneError(f"retry policy needs attempts >= 1 and non-negative times, got {self}.")

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        wait = rng.uniform(0.0, min(self.cap, self.base * (2 ** attempt)))
        if retry_after is not None:  # the server knows best, within our cap
            wait = max(wait, min(self.cap, retry_after))
        return wait


@dataclass(frozen=True)
class RoundInfo:
    round: int
    base_model_sha256: str
    method: dict
    global_sha256: str
    min_updates: int | None = None
    deadline: object = None
    accepted: int = 0

    @classmethod
    def from_json(cls, data, where: str) -> "RoundInfo":
        problems = []
        if not isinstance(data, dict):
            raise CollectorError(f"{where}: expected a JSON object, got {type(data).__name__}; is this an edgetune collector?")
        if not isinstance(data.get("round"), int) or isinstance(data.get("round"), bool) or data["round"] < 0:
            problems.append(f"`round` is {data.get('round')!r}, not a whole number >= 0")
        for key in ("base_model_sha256", "global_sha256"):
            if not isinstance(data.get(key), str):
                problems.append(f"`{key}` is {data.get(key)!r}, not a string")
        if not isinstance(data.get("method"), dict):
            problems.append(f"`method` is {data.get('method')!r}, not an object")
        if problems:
            raise CollectorError(f"{where}: malformed round description ({'; '.join(problems)}); "
                                 "is the server an edgetune collector of this version?")
        return cls(data["round"], data["base_model_sha256"], data["method"], data["global_sha256"],
                   data.get("min_updates"), data.get("deadline"), int(data.get("accepted") or 0))


@dataclass
class CollectorClient:
    """One collector at ``server`` (``http://host:port``). ``token`` is the device's bearer token."""

    server: str
    token: str | None = None
    device: str | None = None
    timeout: float = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    log: Callable[[str], None] = lambda message: None

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlsplit(self.server)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise CollectorError(f"--server {self.server!r} is not an http(s) URL; give e.g. http://127.0.0.1:8750.")
        self.server = self.server.rstrip("/")

    # --- the four endpoints --------------------------------------------------------------------
    def round_info(self) -> RoundInfo:
        status, body, _ = self._request("GET", "/v1/round")
        return RoundInfo.from_json(_json(body, f"{self.server}/v1/round"), f"{self.server}/v1/round")

    def global_adapter(self, round_number: int) -> bytes:
        _, body, _ = self._request("GET", f"/v1/rounds/{int(round_number)}/global")
        return body

    def push(self, round_number: int, data: bytes, update_id: str) -> tuple[int, dict]:
        """Upload an update; returns (HTTP status, the server's answer). Safe to repeat with the same id."""
        headers = {"Content-Type": "application/octet-stream", "X-Edgetune-Update-Id": update_id}
        status, body, _ = self._request("POST", f"/v1/rounds/{int(round_number)}/updates", data, headers)
        return status, _json(body, f"{self.server}/v1/rounds/{round_number}/updates")

    def status(self) -> dict:
        _, body, _ = self._request("GET", "/v1/status")
        return _json(body, f"{self.server}/v1/status")

    # --- transport -----------------------------------------------------------------------------
    def _request(self, method: str, path: str, data: bytes | None = None,
                 headers: dict | None = None) -> tuple[int, bytes, dict]:
        """One request with bounded, jittered retries on connection errors, 5xx, 429 and 503."""
        url = self.server + path
        waited = 0.0
        for attempt in range(self.retry.attempts):
            try:
                return self._once(method, url, data, headers or {})
            except CollectorError as exc:
                if not exc.retryable:
                    raise
                last = exc
            retry_after = getattr(last, "retry_after", None)
            if attempt + 1 == self.retry.attempts:
                break
            wait = self.retry.delay(attempt, self.rng, retry_after)
            if waited + wait > self.retry.budget:
                break
            self.log(f"{method} {url}: {last}; retrying in {wait:.1f} s (attempt {attempt + 2}/{self.retry.attempts})")
            self.sleep(wait)
            waited += wait
        raise CollectorError(f"{method} {url} failed after {attempt + 1} attempt(s) and {waited:.0f} s of back-off: "
                             f"{last}. Nothing is lost: run the same command again later.", last.status, True)

    def _once(self, method: str, url: str, data: bytes | None, headers: dict) -> tuple[int, bytes, dict]:
        headers = {"Accept": "application/json, application/octet-stream", **headers}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.device:
            headers["X-Edgetune-Device"] = self.device
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, _read_capped(response, url), dict(response.headers)
        except urllib.error.HTTPError as exc:
            body = _read_capped(exc, url, swallow=True)
            message = _error_message(body) or exc.reason
            error = CollectorError(f"the collector answered {exc.code}: {message}", exc.code,
                                   retryable=exc.code in RETRYABLE_STATUS)
            error.retry_after = _seconds(exc.headers.get("Retry-After") if exc.headers else None)
            raise error from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CollectorError(f"cannot reach {url} ({reason})", None, retryable=True) from None


def _read_capped(response, url: str, swallow: bool = False) -> bytes:
    try:
        body = response.read(MAX_BODY + 1)
    except (OSError, ConnectionError) as exc:  # connection cut mid-body: retry the whole request
        if swallow:
            return b""
        raise CollectorError(f"the connection to {url} broke while reading the answer ({exc})", None, True) from None
    if len(body) > MAX_BODY:
        raise CollectorError(f"{url} sent more than {MAX_BODY:,} bytes; refusing to read it.")
    return body


def _json(body: bytes, where: str):
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CollectorError(f"{where}: the answer is not JSON ({exc}); is this an edgetune collector?") from None


def _error_message(body: bytes) -> str | None:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return body[:200].decode("utf-8", "replace").strip() or None
    return str(data.get("error")) if isinstance(data, dict) and data.get("error") else None


def _seconds(value) -> float | None:
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return None
