"""A stand-in collector speaking the HTTP contract of `edgetune collect serve`, for device-side tests.

Stdlib only (http.server in a thread). It serves one round's global adapter, stores uploads by
update id with the contract's idempotency rules, and can misbehave on purpose: answer 503 a few
times, drop the connection after storing an upload, or hold an upload unanswered until released.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class FakeCollector:
    base_model_sha256: str
    method: dict
    global_bytes: bytes
    round: int = 0
    fail_first: int = 0  # answer 503 to this many requests first
    drop_after_store: int = 0  # store this many uploads, then cut the connection without answering
    hold_push: threading.Event | None = None  # when set: uploads wait (unanswered) until it is set
    refuse_with: tuple[int, str] | None = None  # answer every upload with this status and message
    updates: dict = field(default_factory=dict)  # update id -> (round, bytes)
    answers: dict = field(default_factory=dict)  # update id -> first answer
    log: list = field(default_factory=list)  # (method, path, update id or None)
    pushes_seen: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.lock = threading.Lock()
        self.global_sha256 = hashlib.sha256(self.global_bytes[: -32]).hexdigest()  # unsigned: the delta checksum
        handler = _handler(self)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.hold_push is not None:
            self.hold_push.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def pushes(self) -> list:
        return [entry for entry in self.log if entry[0] == "POST"]


def _handler(server: FakeCollector):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, body: bytes, content_type: str = "application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, data: dict):
            self._send(status, json.dumps(data).encode())

        def _failing(self) -> bool:
            with server.lock:
                if server.fail_first > 0:
                    server.fail_first -= 1
                    self._json(503, {"error": "busy, try later"})
                    return True
            return False

        def do_GET(self):
            server.log.append(("GET", self.path, None))
            if self._failing():
                return
            if self.path == "/v1/round":
                self._json(200, {"round": server.round, "base_model_sha256": server.base_model_sha256,
                                 "method": server.method, "global_sha256": server.global_sha256,
                                 "min_updates": 1, "deadline": None, "accepted": len(server.updates)})
            elif self.path == f"/v1/rounds/{server.round}/global":
                self._send(200, server.global_bytes, "application/octet-stream")
            else:
                self._json(404, {"error": f"no such resource {self.path}"})

        def do_POST(self):
            update_id = self.headers.get("X-Edgetune-Update-Id")
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            server.log.append(("POST", self.path, update_id, body))
            server.pushes_seen.set()
            if self._failing():
                return
            if server.hold_push is not None and not server.hold_push.is_set():
                server.hold_push.wait(60)
                self.close_connection = True
                return
            if server.refuse_with is not None:
                self._json(server.refuse_with[0], {"error": server.refuse_with[1]})
                return
            if self.path != f"/v1/rounds/{server.round}/updates":
                self._json(410, {"error": f"round closed; the current round is {server.round}"})
                return
            with server.lock:
                if update_id in server.updates:
                    if server.updates[update_id][1] != body:
                        self._json(409, {"error": "update id reused with different bytes"})
                    else:
                        self._json(200, server.answers[update_id])
                    return
                server.updates[update_id] = (server.round, body)
                server.answers[update_id] = {"update_id": update_id, "round": server.round, "status": "accepted",
                                             "weight": 1.0}
                if server.drop_after_store > 0:
                    server.drop_after_store -= 1
                    self.close_connection = True
                    self.connection.close()
                    return
            self._json(201, server.answers[update_id])

    return Handler
