"""Task sequence-classification: one AdamW step equals transformers + PEFT (LoRA + the head as
modules_to_save, mean pooling) on both backends; the logits graph equals the reference's logits;
labelled records are checked; the export refuses what does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgetune.bundle import Bundle
from tests.classification_reference import reference_classifier, reference_logits, reference_step
from tests.test_runtime import _cli

RTOL = 1e-4
ROWS = [("hello there", "greet"), ("will it rain tomorrow", "weather"), ("play some music please", 2),
        ("good morning", 0), ("is it sunny outside in oslo today", "weather")]


def write_rows(path: Path, rows=ROWS, repeat: int = 1) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows * repeat))
    return path


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture(scope="module")
def fp32_bundle(export_tiny_bert) -> Path:
    return export_tiny_bert(quantize="none")


@pytest.mark.parametrize("backend_name", ["ort-training", "portable"])
def test_one_adamw_step_matches_transformers_peft(fp32_bundle, tiny_bert_dir, tmp_path, backend_name):
    from edgetune.runtime.backend import open_backend
    from edgetune.runtime.classification import TASK, all_logits

    opened = Bundle.open(fp32_bundle)
    manifest = opened.manifest
    examples, stats = TASK.load(opened, write_rows(tmp_path / "d.jsonl"), 64, False)
    assert [e.label for e in examples] == [0, 1, 2, 0, 1] and stats.class_counts == {"greet": 2, "weather": 2, "music": 1}
    backend = open_backend(backend_name, opened)
    rng = np.random.default_rng(1)  # B != 0 and a head far from its init: every tensor gets a real gradient
    start = {k: v + rng.normal(0, 0.2, v.shape).astype(np.float32) for k, v in backend.initial_adapter().items()}
    backend.set_trainable(start)
    batch = TASK.batch(examples, manifest.tokenizer.pad_token_id)
    assert batch["attention_mask"].min() == 0  # rows of different lengths: the padding path is exercised
    lr = 1e-2
    loss = backend.train_step(batch)
    backend.optimizer_step(lr)
    after = backend.trainable()

    by_peft = {t.peft_key: start[t.graph_name] for t in manifest.trainable}
    reference = reference_classifier(tiny_bert_dir, manifest, by_peft)
    np.testing.assert_allclose(all_logits(opened, start, examples, 2), reference_logits(reference, batch),
                               rtol=RTOL, atol=1e-5)  # the logits graph: the same model, batched differently
    ref_loss, ref_after = reference_step(reference, batch, lr, manifest.optimizer)
    assert abs(loss - ref_loss) <= RTOL * abs(ref_loss)
    assert sorted(ref_after) == sorted(by_peft)  # PEFT's own keys: LoRA tensors and the head
    for t in manifest.trainable:
        assert _rel(after[t.graph_name], ref_after[t.peft_key]) <= RTOL, t.peft_key
        assert not np.allclose(after[t.graph_name], start[t.graph_name]), t.peft_key


def test_manifest_records_labels_head_and_peft_mapping(fp32_bundle):
    manifest = Bundle.open(fp32_bundle).manifest
    assert manifest.task == "sequence-classification"
    assert manifest.task_config["labels"] == ["greet", "weather", "music"] and manifest.task_config["pooling"] == "mean"
    assert manifest.task_config["head_tensors"] == ["model.classifier.weight", "model.classifier.bias"]
    peft = manifest.method["peft_config"]
    assert peft["task_type"] == "SEQ_CLS" and peft["modules_to_save"] == ["classifier"]
    assert peft["target_modules"] == ["query", "value"]  # BERT's layers, not the decoder default
    assert [i.dims for i in manifest.inputs] == [["batch", "sequence"], ["batch", "sequence"], ["batch"]]
    assert manifest.portable["supported"] and manifest.generation is None


@pytest.mark.parametrize("record, expected", [
    ({"text": "hi", "label": "sport"}, "field \"label\" 'sport' is not one of the bundle's classes (greet, weather, music)"),
    ({"text": "hi"}, 'missing field "label"'),
    ({"label": "greet"}, 'missing field "text"'),
    ({"text": "hi", "label": 3}, 'field "label" index 3 is out of range'),
    ({"text": "hi", "label": True}, 'field "label" must be a class name or an index'),
    ({"text": "  ", "label": 0}, 'field "text" must be a non-empty string'),
])
def test_bad_records_name_file_line_and_field(export_tiny_bert, tmp_path, record, expected):
    path = write_rows(tmp_path / "bad.jsonl", ROWS[:2])
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    r = _cli("eval", export_tiny_bert(), "--data", path)
    assert r.returncode == 2 and "bad.jsonl line 3" in r.stderr and expected in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_skip_bad_and_imbalance_are_reported(export_tiny_bert, tmp_path):
    from edgetune.runtime.classification import TASK

    path = write_rows(tmp_path / "d.jsonl", [("hello", "greet")] * 9 + [("rain", "weather")] * 2)
    with open(path, "a") as f:
        f.write('{"text": "x", "label": "sport"}\n')
    _, stats = TASK.load(Bundle.open(export_tiny_bert()), path, 64, True)
    assert stats.skipped_bad == 1 and stats.bad_lines == [12] and stats.examples == 11
    assert stats.class_counts == {"greet": 9, "weather": 2, "music": 0}
    assert any("no examples of music" in n for n in stats.notes) and any("imbalanced" in n for n in stats.notes)


def test_scores_against_a_hand_count():
    from edgetune.runtime.classification import scores

    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]))
    m = scores(logits, np.array([0, 1, 1, 2]), ["a", "b", "c"])
    assert m["accuracy"] == 0.75
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.7, 0.8, 0.3, 0.6])))
    assert (m["precision/a"], m["recall/a"], m["precision/b"], m["recall/b"]) == (0.5, 1.0, 1.0, 0.5)
    assert m["macro_f1"] == pytest.approx(np.mean([2 / 3, 2 / 3, 1.0]))


@pytest.mark.parametrize("args, expected", [
    (["--method", "prefix", "--num-labels", "3"], "--method prefix is not available for --task sequence-classification"),
    (["--num-labels", "1"], "--num-labels must be at least 2"),
    (["--labels", "a,a"], "--labels must be distinct"),
    (["--num-labels", "2", "--labels", "a,b,c"], "--num-labels 2 but --labels names 3"),
    ([], "give --num-labels N"),
])
def test_export_refuses_what_does_not_fit(tiny_bert_dir, tmp_path, args, expected):
    r = _cli("export", tiny_bert_dir, "--task", "sequence-classification", *args, "--out", tmp_path / "b")
    assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_export_refuses_a_decoder(tiny_model_dir, tmp_path):
    r = _cli("export", tiny_model_dir, "--task", "sequence-classification", "--num-labels", "2", "--out", tmp_path / "b")
    assert r.returncode == 2 and "is of type 'llama', not an encoder" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _cli("export", tiny_model_dir, "--num-labels", "2", "--out", tmp_path / "b")
    assert r.returncode == 2 and "apply to --task sequence-classification only" in r.stderr, r.stderr
