"""Helpers for the portable-backend tests: run ``edgetune train`` under some interpreter, read the run back.

A run is compared by what it leaves in its state folder: the per-step losses in ``metrics.jsonl``
(rounded to 6 decimals there) and the trainable tensors of the last checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PAIRS = [
    ("What is the colour of the sky?", "blue"),
    ("Name a fruit.", "apple"),
    ("Say hello.", "hello there"),
    ("Count to three.", "one two three"),
    ("Which animal barks?", "a dog"),
    ("Opposite of cold?", "hot"),
]


def write_pairs(path: Path, repeat: int = 4) -> Path:
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in PAIRS * repeat))
    return path


def python312() -> Path | None:
    """The Python 3.12 environment that ``make venv312`` builds with the base install only."""
    path = Path(os.environ.get("EDGETUNE_PY312", REPO / ".venv312" / "bin" / "python"))
    return path if path.is_file() else None


def train_cli(bundle: Path, state_dir: Path, *args, python: list[str] | None = None, env: dict | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """``edgetune train BUNDLE --state-dir STATE_DIR --quiet ARGS`` under ``python`` (default: this one)."""
    cmd = [*(python or [sys.executable]), "-m", "edgetune.cli", "train", str(bundle), "--state-dir", str(state_dir),
           "--quiet", *map(str, args)]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env, cwd=REPO)


def read_run(state_dir: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(losses by step, trainable tensors of the newest checkpoint) of a finished run."""
    from safetensors.numpy import load_file

    rows = [json.loads(line) for line in (state_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    latest = (state_dir / "LATEST").read_text().strip()
    return np.array([r["loss"] for r in rows]), load_file(str(state_dir / latest / "adapter.safetensors"))


def relative_error(a: dict[str, np.ndarray], b: dict[str, np.ndarray], names=None) -> float:
    """||a - b|| / ||b|| over the tensors ``names`` (default: all) taken together, in float64."""
    names = list(b) if names is None else names
    diff = sum(float(np.sum((a[n].astype(np.float64) - b[n]) ** 2)) for n in names)
    norm = sum(float(np.sum(b[n].astype(np.float64) ** 2)) for n in names)
    return (diff / max(norm, 1e-300)) ** 0.5


def assert_same_run(run, reference, rtol: float = 1e-4, per_tensor: float = 1e-3) -> None:
    """Every step's loss within ``rtol``; the final trainable tensors within ``rtol`` taken together,
    and each one within ``per_tensor`` on its own.

    Why a looser bound per tensor: AdamW moves an element by about lr * m / sqrt(v), whatever the size
    of its gradient, so an element whose gradient is at float-rounding level can move differently in
    two runs that agree everywhere else. On SmolLM2-135M (20 steps, batch 2, lr 1e-3) the ort-training
    and Python 3.12 portable runs differed by 6e-6 over all tensors, 1e-4 on the worst one."""
    losses, weights = run
    ref_losses, ref_weights = reference
    assert losses.shape == ref_losses.shape, (losses.shape, ref_losses.shape)
    np.testing.assert_allclose(losses, ref_losses, rtol=rtol)
    assert weights.keys() == ref_weights.keys()
    assert relative_error(weights, ref_weights) <= rtol, relative_error(weights, ref_weights)
    worst = max(ref_weights, key=lambda n: relative_error(weights, ref_weights, [n]))
    assert relative_error(weights, ref_weights, [worst]) <= per_tensor, (worst, relative_error(weights, ref_weights, [worst]))


def assert_trained(weights: dict[str, np.ndarray], initial: dict[str, np.ndarray]) -> None:
    """Every tensor moved away from the bundle's initial adapter (else a parity check proves nothing)."""
    for name, start in initial.items():
        assert not np.allclose(weights[name], start, rtol=0, atol=1e-6), name
