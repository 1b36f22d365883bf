"""Slow tests on the real default model (SmolLM2-135M-Instruct, int8 base): export, train, measure."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from edgetune.bundle import Bundle, read_manifest

pytestmark = pytest.mark.slow
DATA = Path(str(resources.files("edgetune") / "data"))


@pytest.fixture(scope="module")
def default_bundle(tmp_path_factory) -> Path:
    from edgetune.export.exporter import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("default") / "bundle"
    export_bundle(ExportOptions(source=None, out=out))
    return out


def test_default_export_manifest(default_bundle):
    m = read_manifest(default_bundle)
    assert m.base_model["id"] == "smollm2-135m" and m.quantization == "int8"
    assert len(m.trainable) == 30 * 2 * 2
    trainable = sum(int(np.prod(t.shape)) for t in m.trainable)
    assert trainable == 30 * (8 * 576 + 576 * 8 + 8 * 576 + 192 * 8) == 460_800  # q: 576->576, v: 576->192
    assert m.tokenizer.chat_template and 2 in m.tokenizer.stop_token_ids  # <|im_end|>


def test_training_improves_heldout_task(default_bundle):
    from edgetune.runtime.evaluate import evaluate
    from edgetune.runtime.trainer import TrainOptions, train

    held = DATA / "records-heldout.jsonl"
    before = evaluate(Bundle.open(default_bundle), held, max_seq_len=128)["with_adapter"]["loss"]
    result = train(Bundle.open(default_bundle), TrainOptions(data=DATA / "records-train.jsonl", steps=30, batch_size=8, lr=1e-3,
                                                warmup=3, max_seq_len=128, save_every=100), progress=False)
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5])
    after = evaluate(Bundle.open(default_bundle), held, max_seq_len=128)
    assert after["with_adapter"]["loss"] < 0.7 * before
    assert abs(after["without_adapter"]["loss"] - before) < 1e-4  # adapter off is the base model
    from edgetune.runtime.answer import Answerer

    records = [json.loads(x) for x in held.read_text().splitlines()][:8]
    answerer = Answerer(Bundle.open(default_bundle, verify=False))
    exact = lambda on: sum(answerer(f"{r['instruction']}\n\n{r['context']}", max_new_tokens=24, use_adapter=on) == r["output"]  # noqa: E731
                           for r in records)
    assert exact(True) > exact(False)


def test_delta_is_under_half_a_percent_of_the_base(default_bundle, tmp_path):
    from edgetune.delta import read_delta, write_delta
    from edgetune.runtime.adapter_source import latest_adapter

    m = read_manifest(default_bundle)
    tensors = {t.peft_key: v for t, v in zip(m.trainable, (latest_adapter(Bundle.open(default_bundle, verify=False)).tensors[t.graph_name] for t in m.trainable))}
    base_bytes = 4 * m.base_model["parameters"]
    sizes = {}
    for codec in ("fp32", "fp16", "int8"):
        sizes[codec] = write_delta(tmp_path / f"{codec}.etd", tensors, base_model_sha256=m.base_sha256,
                                   method={"name": "lora", "config": m.method["config"]}, codec=codec)
        assert read_delta(tmp_path / f"{codec}.etd").header["codec"] == codec
    print({k: f"{v / 1e6:.2f} MB ({100 * v / base_bytes:.3f}% of the fp32 base)" for k, v in sizes.items()})
    assert sizes["fp16"] < 1.0e6 and sizes["int8"] < 0.6e6
    assert sizes["int8"] < 0.005 * base_bytes and sizes["fp16"] < 0.005 * base_bytes


def test_python312_stock_onnxruntime_matches_ort_training_on_default_model(default_bundle, tmp_path):
    """20 steps of the real model: the portable backend on Python 3.12's stock onnxruntime (base install
    only) gives the ort-training backend's losses and weights within 1e-4 relative (tests/portable_runs.py)."""
    from tests.portable_runs import assert_same_run, python312, read_run, train_cli

    py312 = python312()
    if py312 is None:
        pytest.skip("no Python 3.12 environment: run `make venv312`")
    args = ["--data", DATA / "records-train.jsonl", "--steps", 20, "--batch-size", 2, "--max-seq-len", 128,
            "--lr", 1e-3, "--warmup", 3]
    reference = train_cli(default_bundle, tmp_path / "ort", *args, "--backend", "ort-training")
    assert reference.returncode == 0, reference.stderr[-2000:]
    stock = train_cli(default_bundle, tmp_path / "py312", *args, "--backend", "portable", python=[str(py312)])
    assert stock.returncode == 0, stock.stderr[-2000:]
    assert_same_run(read_run(tmp_path / "py312"), read_run(tmp_path / "ort"), rtol=1e-4)
