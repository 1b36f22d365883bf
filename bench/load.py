"""Load test of the collector on loopback: N simulated devices upload concurrently (a benchmark, not a test).

    python bench/load.py [--devices 1000] [--concurrency 64] [--bundle PATH] [--time-limit 600]

1. A store (`collect init`) for a bundle (default: a tiny Llama exported here; `--bundle` reuses
   one, e.g. the default model's), N devices registered with tokens, and N distinct updates
   (the round's global plus a random step, full fp16 deltas) built before the clock starts.
2. `edgetune collect serve --min-updates N` in its own process on 127.0.0.1; its RSS (with any
   children) is sampled every 20 ms.
3. The devices upload concurrently (at most `--concurrency` in flight) with httpx; like
   `edgetune sync`, a device retries a connection error, 5xx, 429 or 503 with the same update id
   and bytes. Latency is measured per upload attempt that got an answer, request to response.
4. Checks, then prints the figures: every device got 201 (or 200, a retry's first answer); the
   server's status counts exactly N accepted updates for round 0 and none refused; the store holds
   N update rows with N distinct ids and N distinct devices; the round closed once (round 1 open).
   Any failure exits 1. Bounded: N <= 1000 and a whole-run time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MAX_DEVICES = 1000
RETRYABLE = {429, 500, 502, 503, 504}


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TQDM_DISABLE="1")


def _cli(*args) -> str:
    r = subprocess.run([sys.executable, "-m", "edgetune.cli", *map(str, args)], capture_output=True, text=True,
                       env=_env(), cwd=ROOT, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"`edgetune {' '.join(map(str, args))}` failed: {r.stderr[-2000:]}")
    return r.stdout


def tiny_bundle(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.tiny_model import build_tiny_model_dir

    model = build_tiny_model_dir(folder / "tiny-llama")
    _cli("export", model, "--out", folder / "bundle", "--quantize", "none")
    return folder / "bundle"


def register(store: Path, n: int) -> dict[str, str]:
    """N devices with tokens, through the store's own API (one `collect devices add` per device is slow)."""
    import secrets

    from edgetune.federated.collector import token_hash
    from edgetune.federated.store import Store

    s = Store(store)
    tokens = {}
    for i in range(n):
        device, token = f"load-{i:04d}", secrets.token_urlsafe(32)
        s.add_device(device, token_hash(token), None)
        tokens[device] = token
    s.close()
    return tokens


def updates(global_bytes: bytes, devices: list[str], seed: int = 0) -> dict[str, bytes]:
    from edgetune.delta import encode_delta, read_delta

    glob = read_delta(global_bytes)
    rng = np.random.default_rng(seed)
    out = {}
    for d in devices:
        tensors = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in glob.tensors.items()}
        out[d] = encode_delta(tensors, base_model_sha256=glob.base_model_sha256, method=glob.method, codec="fp16",
                              num_examples=int(rng.integers(5, 50)), round_id="0", metrics={"loss": 1.0})
    return out


class RssSampler(threading.Thread):
    """Peak RSS of a process and its children, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        import psutil

        self.proc, self.interval, self.peak, self.stop = psutil.Process(pid), interval, 0, threading.Event()

    def run(self):
        import psutil

        while not self.stop.is_set():
            try:
                rss = self.proc.memory_info().rss + sum(c.memory_info().rss for c in self.proc.children(recursive=True))
                self.peak = max(self.peak, rss)
            except psutil.Error:
                return
            time.sleep(self.interval)


async def upload_all(url: str, tokens: dict[str, str], bodies: dict[str, bytes], concurrency: int,
                     max_attempts: int = 8) -> dict:
    import httpx

    latencies, statuses, retries = [], {}, 0
    limit = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=120.0, limits=limits) as client:
        async def one(device: str):
            nonlocal retries
            update_id = str(uuid.uuid4())
            headers = {"Authorization": f"Bearer {tokens[device]}", "X-Edgetune-Device": device,
                       "X-Edgetune-Update-Id": update_id, "Content-Type": "application/octet-stream"}
            async with limit:
                for attempt in range(max_attempts):
                    t0 = time.perf_counter()
                    try:
                        r = await client.post(f"{url}/v1/rounds/0/updates", content=bodies[device], headers=headers)
                    except httpx.TransportError:
                        retries += 1
                        await asyncio.sleep(min(2.0, 0.05 * 2 ** attempt))
                        continue
                    latencies.append(time.perf_counter() - t0)
                    if r.status_code in RETRYABLE:
                        retries += 1
                        await asyncio.sleep(min(2.0, 0.05 * 2 ** attempt))
                        continue
                    statuses[device] = (r.status_code, r.json(), update_id)
                    return
                statuses[device] = (None, {"error": "gave up"}, update_id)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(d) for d in bodies))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "statuses": statuses, "retries": retries, "wall_s": wall}


def check(store: Path, url: str, n: int, statuses: dict) -> list[str]:
    import httpx

    problems = []
    bad = {d: s for d, s in statuses.items() if s[0] not in (200, 201) or s[1].get("status") != "accepted"}
    if bad:
        problems.append(f"{len(bad)} device(s) not acknowledged, e.g. {next(iter(bad.items()))}")
    ids = {s[2] for s in statuses.values()}
    acked = {s[1].get("update_id") for s in statuses.values() if s[0] in (200, 201)}
    if acked != ids:
        problems.append("acknowledged update ids differ from the ids sent")
    deadline = time.monotonic() + 120
    while True:  # the N-th upload triggers the aggregation; wait for round 1 (bounded)
        status = httpx.get(url + "/v1/status", timeout=30).json()
        if status["current_round"] >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    round0 = status["rounds"][0]
    if status["current_round"] != 1:
        problems.append(f"the round did not close exactly once: current round {status['current_round']}")
    if round0["accepted"] != n or status.get("refused_total", 0) != 0:
        problems.append(f"status counts {round0['accepted']} accepted, {status.get('refused_total')} refused; expected {n}, 0")
    from edgetune.federated.store import DATABASE

    db = sqlite3.connect(f"file:{store / DATABASE}?mode=ro", uri=True)  # read-only: what is durable
    rows, distinct_ids, distinct_devices = db.execute(
        "SELECT COUNT(*), COUNT(DISTINCT update_id), COUNT(DISTINCT device_id) FROM updates").fetchone()
    stored_ids = {r[0] for r in db.execute("SELECT update_id FROM updates")}
    db.close()
    if not (rows == distinct_ids == distinct_devices == n):
        problems.append(f"the store holds {rows} rows, {distinct_ids} ids, {distinct_devices} devices; expected {n} each")
    if stored_ids != ids:
        problems.append(f"{len(ids - stored_ids)} sent id(s) missing from the store, {len(stored_ids - ids)} unknown")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000, help=f"simulated devices, 1..{MAX_DEVICES}")
    parser.add_argument("--concurrency", type=int, default=64, help="uploads in flight at once")
    parser.add_argument("--bundle", type=Path, default=None, help="bundle to serve (default: a tiny Llama export)")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds for the uploads, at most")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.devices <= MAX_DEVICES or args.concurrency < 1:
        parser.error(f"--devices must be in 1..{MAX_DEVICES} and --concurrency >= 1")
    work = Path(tempfile.mkdtemp(prefix="edgetune-load-"))
    server = None
    try:
        bundle = args.bundle or tiny_bundle(work)
        store = work / "fleet"
        _cli("collect", "init", "--bundle", bundle, "--store", store)
        tokens = register(store, args.devices)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        log = open(work / "server.log", "w")
        server = subprocess.Popen([sys.executable, "-m", "edgetune.cli", "collect", "serve", "--store", store,
                                   "--port", str(port), "--min-updates", str(args.devices)],
                                  stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                info = httpx.get(url + "/v1/round", timeout=2)
                if info.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the collector did not start: {(work / 'server.log').read_text()[-2000:]}")
            time.sleep(0.1)
        bodies = updates(httpx.get(url + "/v1/rounds/0/global", timeout=30).content, list(tokens))
        sampler = RssSampler(server.pid)
        sampler.start()
        result = asyncio.run(asyncio.wait_for(upload_all(url, tokens, bodies, args.concurrency), args.time_limit))
        problems = check(store, url, args.devices, result["statuses"])
        sampler.stop.set()
        sampler.join()
        lat = np.array(result["latencies"]) * 1000
        figures = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python bench/load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "devices": args.devices, "concurrency": args.concurrency,
            "update_bytes": int(np.median([len(b) for b in bodies.values()])),
            "admitted": sum(1 for s in result["statuses"].values() if s[0] in (200, 201)),
            "wall_s": round(result["wall_s"], 2),
            "admitted_per_s": round(args.devices / result["wall_s"], 1),
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 1),
            "latency_p99_ms": round(float(np.percentile(lat, 99)), 1),
            "retries": result["retries"],
            "server_peak_rss_mb": round(sampler.peak / 2 ** 20, 1),
            "cpus": os.cpu_count(),
            "lost_or_duplicated": problems,
        }
        print(f"{figures['devices']} devices, {figures['concurrency']} in flight, updates of "
              f"{figures['update_bytes']:,} bytes, on {figures['cpus']} CPUs ({figures['date']})")
        print(f"  admitted            {figures['admitted']} in {figures['wall_s']} s = {figures['admitted_per_s']} updates/s")
        print(f"  latency per upload  p50 {figures['latency_p50_ms']} ms, p99 {figures['latency_p99_ms']} ms "
              f"({figures['retries']} retries)")
        print(f"  server peak RSS     {figures['server_peak_rss_mb']} MB")
        print("  nothing lost or counted twice" if not problems else "  PROBLEMS: " + "; ".join(problems))
        if args.json_out:
            args.json_out.write_text(json.dumps(figures, indent=2) + "\n")
        return 1 if problems else 0
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
