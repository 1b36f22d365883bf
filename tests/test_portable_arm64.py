"""The portable backend on a real ARM instruction set: an arm64 Python 3.11 with the stock aarch64
onnxruntime wheel, emulated by qemu user mode (``make arm64-env`` sets it up from Debian's packages
and the package index), trains a tiny bundle with the same losses as the x86 run here.

qemu runs matrix products about 550x slower than native, so the model is the tiny one and the run
is a few steps."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.portable_runs import REPO, assert_same_run, read_run, train_cli, write_pairs

ARM64 = REPO / "build" / "arm64"
QEMU = shutil.which("qemu-aarch64-static")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (ARM64 / "READY").is_file() or QEMU is None,
                       reason="no arm64 emulation: run `make arm64-env` (root, apt-get, qemu-user-static)"),
]
STEPS = 4


def test_arm64_stock_onnxruntime_matches_x86(export_tiny, tmp_path):
    bundle = export_tiny(quantize="int8")
    data = write_pairs(tmp_path / "pairs.jsonl", repeat=2)
    args = ["--data", data, "--steps", STEPS, "--batch-size", 2, "--lr", 5e-3, "--backend", "portable"]
    x86 = train_cli(bundle, tmp_path / "x86", *args)
    assert x86.returncode == 0, x86.stderr[-2000:]
    python = [QEMU, "-L", str(ARM64 / "sysroot"), str(ARM64 / "sysroot" / "usr" / "bin" / "python3.11")]
    probe = train_cli(bundle, tmp_path / "arm", *args, python=python,
                      env={"PYTHONPATH": f"{ARM64 / 'site'}:{REPO}"}, timeout=1800)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert_same_run(read_run(tmp_path / "arm"), read_run(tmp_path / "x86"), rtol=1e-4)
