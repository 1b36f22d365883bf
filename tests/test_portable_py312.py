"""The stock onnxruntime package trains: a bundle exported here trains in a Python 3.12 environment
that has only ``pip install edgetune`` (no torch, no training build; ``make venv312`` builds it),
with the same losses and weights as the ort-training backend here."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from edgetune.runtime.ort_import import training_build_installed
from tests.portable_runs import assert_same_run, assert_trained, python312, read_run, train_cli, write_pairs

PY312 = python312()
pytestmark = [
    pytest.mark.skipif(PY312 is None, reason="no Python 3.12 environment: run `make venv312` (needs a python3.12 "
                                             "interpreter; set EDGETUNE_PY312 to use another one)"),
    pytest.mark.skipif(not training_build_installed(), reason="needs onnxruntime-training-cpu here for the reference run"),
]
STEPS = 20
CHECK_STOCK = """
import importlib.util, json, pathlib, sys
spec = importlib.util.find_spec("onnxruntime")
folder = pathlib.Path(list(spec.submodule_search_locations)[0])
import onnxruntime
print(json.dumps({"python": list(sys.version_info[:2]), "onnxruntime": onnxruntime.__version__,
                  "training_build": (folder / "training").is_dir(), "torch": importlib.util.find_spec("torch") is not None}))
"""


def _stock_environment() -> dict:
    import json

    out = subprocess.run([str(PY312), "-c", CHECK_STOCK], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _train_both(bundle: Path, tmp_path: Path, *args) -> tuple:
    reference = train_cli(bundle, tmp_path / "ort", *args, "--backend", "ort-training")
    assert reference.returncode == 0, reference.stderr[-2000:]
    stock = train_cli(bundle, tmp_path / "py312", *args, "--backend", "portable", python=[str(PY312)])
    assert stock.returncode == 0, stock.stderr[-2000:]
    return read_run(tmp_path / "py312"), read_run(tmp_path / "ort")


def test_environment_is_the_stock_package():
    env = _stock_environment()
    assert env["python"] == [3, 12] and not env["training_build"] and not env["torch"], env


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_python312_stock_onnxruntime_matches_ort_training(export_tiny, tmp_path, quantize):
    from edgetune.export.artifacts import AdamWSettings
    from edgetune.bundle import Bundle
    from edgetune.runtime.adapter_source import initial_adapter

    bundle = export_tiny(quantize=quantize, adamw=AdamWSettings(weight_decay=0.01))
    data = write_pairs(tmp_path / "pairs.jsonl")
    run, reference = _train_both(bundle, tmp_path, "--data", data, "--steps", STEPS, "--batch-size", 2,
                                 "--grad-accum", 2, "--lr", 5e-3, "--warmup", 2)
    assert len(reference[0]) == STEPS
    assert_same_run(run, reference, rtol=1e-4)
    assert_trained(reference[1], initial_adapter(Bundle.open(bundle)))
