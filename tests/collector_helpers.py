"""Test helpers for the collector: a real `edgetune collect serve` process on 127.0.0.1, devices, deltas."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgetune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=_env(env), cwd=ROOT)


def _env(extra=None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_store(bundle: Path, store: Path, devices=("dev-0", "dev-1", "dev-2", "dev-3", "dev-4")) -> dict[str, str]:
    """`collect init` + `collect devices add` for each device; returns device -> token."""
    r = cli("collect", "init", "--bundle", bundle, "--store", store)
    assert r.returncode == 0, r.stderr
    tokens = {}
    for d in devices:
        r = cli("collect", "devices", "add", d, "--store", store)
        assert r.returncode == 0, r.stderr
        tokens[d] = r.stdout.strip().splitlines()[-1]
    return tokens


class Server:
    """`edgetune collect serve` in its own process; ``kill()`` sends SIGKILL, ``stop()`` SIGTERM."""

    def __init__(self, store: Path, *args, env=None):
        self.store, self.args, self.env = store, [str(a) for a in args], env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout=60.0) -> "Server":
        import httpx

        self.log = open(self.store.parent / f"server-{self.port}-{time.monotonic_ns()}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgetune.cli", "collect", "serve", "--store",
                                      str(self.store), "--port", str(self.port), *self.args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=_env(self.env), cwd=ROOT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # bounded wait for the port
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/v1/round", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not answer within {timeout} s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def get_global(url: str, n: int):
    import httpx

    from edgetune.delta import read_delta

    r = httpx.get(f"{url}/v1/rounds/{n}/global", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream", r.text
    return read_delta(r.content)


def upload(url: str, n: int, body: bytes, *, device: str, token: str | None = None, update_id: str | None = None,
           content_type: str = "application/octet-stream", timeout: float = 30.0):
    import httpx

    headers = {"X-Edgetune-Device": device, "X-Edgetune-Update-Id": update_id or str(uuid.uuid4()),
               "Content-Type": content_type}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(f"{url}/v1/rounds/{n}/updates", content=body, headers=headers, timeout=timeout)


def device_update(global_delta, rng: np.random.Generator, *, scale=0.05, change_a=True, examples=None,
                  codec="fp32", kind="full", round_id=None, signing_key=None, **overrides) -> bytes:
    """A device's delta: the global adapter plus a random step (the trained adapter), as .etd bytes."""
    from edgetune.delta import encode_delta

    trained = {}
    for k, v in global_delta.tensors.items():
        step = rng.normal(0.0, scale, size=v.shape).astype(np.float32)
        trained[k] = v + (step if change_a or ".lora_A." not in k else 0)
    tensors = {k: trained[k] - global_delta.tensors[k] for k in trained} if kind == "diff" else trained
    args = dict(base_model_sha256=global_delta.base_model_sha256, method=global_delta.method, codec=codec, kind=kind,
                since_sha256=global_delta.sha256 if kind == "diff" else None,
                num_examples=int(examples if examples is not None else rng.integers(5, 50)),
                metrics={"loss": float(rng.uniform(1, 3))}, round_id=round_id, signing_key=signing_key)
    args.update(overrides)
    return encode_delta(tensors, **args)


def reseal(data: bytes) -> bytes:
    """Recompute the checksum of an unsigned delta after its content was edited (a forged but well-framed file)."""
    body = data[:-32]
    return body + hashlib.sha256(body).digest()


def replace_header(data: bytes, edit) -> bytes:
    """An unsigned delta whose JSON header is ``edit(header)``, framed and checksummed again."""
    (head_len,) = struct.unpack_from("<Q", data, 12)
    header = json.loads(data[20:20 + head_len])
    head = json.dumps(edit(header), sort_keys=True).encode()
    rest = data[20 + head_len:-32]
    return reseal(data[:12] + struct.pack("<Q", len(head)) + head + rest + b"\0" * 32)
