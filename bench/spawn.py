"""Run one measurement in a child process; its peak RSS is the kernel's, for that process alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "RESULT "  # the worker's one result line; anything else on stdout is ignored
QUIET = {"TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}  # progress bars, notes


class ChildFailed(RuntimeError):
    pass


def run_child(argv: list[str], *, parse_result: bool) -> dict:
    """Run ``argv``; return {"result", "wall_s", "ru_maxrss_bytes"}. stderr is shown only on failure."""
    with tempfile.TemporaryFile(mode="w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **QUIET})
        out = proc.stdout.read()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)  # rusage of exactly this child
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            tail = "".join(err.readlines()[-40:])
            raise ChildFailed(f"`{' '.join(argv)}` exited with {proc.returncode}:\n{tail}")
    result = None
    if parse_result:
        lines = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
        if not lines:
            raise ChildFailed(f"`{' '.join(argv)}` printed no {RESULT_PREFIX!r} line.")
        result = json.loads(lines[-1][len(RESULT_PREFIX):])
    return {"result": result, "wall_s": wall, "ru_maxrss_bytes": usage.ru_maxrss * 1024}  # KiB on Linux


def worker(kind: str, args: dict) -> dict:
    """Run ``bench/workers.py KIND ARGS``; the result gets ``peak_rss_bytes`` of the whole process.

    The worker resets the kernel's high-water mark after loading (bench/memory.py), so the
    process peak is the larger of the mark read before the reset and wait4's ru_maxrss.
    """
    run = run_child([sys.executable, str(HERE / "workers.py"), kind, json.dumps(args)], parse_result=True)
    result = run["result"]
    result["peak_rss_bytes"] = max(run["ru_maxrss_bytes"], result.get("load_high_water_bytes") or 0)
    result["wall_s"] = run["wall_s"]
    return result
