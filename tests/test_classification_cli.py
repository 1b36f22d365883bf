"""sequence-classification end to end through the CLI: export, train with evaluation during training
(best checkpoint, early stop), eval metrics, predict, delta, to-peft loaded by transformers + PEFT
(BertForSequenceClassification, mean pooled as the bundle), from-peft back."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.test_classification import write_rows
from tests.test_runtime import _cli

TRAIN = [("hello there", "greet"), ("good morning friend", "greet"), ("hi how are you", 0),
         ("will it rain tomorrow", "weather"), ("is it sunny in oslo", "weather"), ("what is the weather like", 1),
         ("play some music", "music"), ("skip this song please", "music"), ("turn the volume up", 2)]
HELD = [("hi friend", "greet"), ("will it rain", "weather"), ("play a song", "music")]


@pytest.fixture()
def bundle(export_tiny_bert, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(export_tiny_bert(), copy)  # int8 base (the default)
    return copy


def _predict(bundle, *args) -> list[dict]:
    r = _cli("predict", bundle, "--text", "hello there", "--text", "will it rain tomorrow", "--json", *args)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def _mean_pooled_peft_probabilities(model_dir: Path, folder: Path, texts: list[str]) -> np.ndarray:
    """What a transformers + PEFT user gets: BertForSequenceClassification with the folder loaded,
    scored through its encoder, mean pooling and its classifier (not its [CLS] pooler)."""
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    from tests.classification_reference import mean_pooled_probabilities

    base = BertForSequenceClassification.from_pretrained(model_dir, num_labels=3, attn_implementation="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, folder).eval()
    assert not [str(w.message) for w in caught if "adapter keys" in str(w.message)]  # nothing missing or unexpected
    inner = model.base_model.model
    return mean_pooled_probabilities(inner.bert, inner.classifier, model_dir, texts)


def test_train_eval_predict_delta_peft_round_trip(bundle, tiny_bert_dir, tmp_path):
    from safetensors.numpy import load_file

    data = write_rows(tmp_path / "train.jsonl", TRAIN, repeat=2)
    held = write_rows(tmp_path / "held.jsonl", HELD)
    before = _predict(bundle)
    assert before[0]["adapter"] == "bundle's initial adapter"
    r = _cli("train", bundle, "--data", data, "--eval-data", held, "--eval-every", 3, "--early-stop", 20,
             "--steps", 24, "--batch-size", 3, "--lr", 2e-2, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "data: classes: greet 6 (33 %), weather 6 (33 %), music 6 (33 %)" in r.stdout
    assert "eval loss:" in r.stdout and "accuracy:" in r.stdout and "macro_f1:" in r.stdout
    rows = [json.loads(x) for x in (bundle / "train-state" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in rows if "eval" in x]
    assert [x["step"] for x in evals] == [3, 6, 9, 12, 15, 18, 21, 24]
    assert {"accuracy", "macro_f1", "loss", "precision/greet", "recall/music"} <= set(evals[0]["eval"])
    best = max(evals, key=lambda x: (x["eval"]["accuracy"], -x["eval"]["loss"]))
    assert [x["step"] for x in evals if x["best"]][-1] == best["step"]

    r = _cli("eval", bundle, "--data", held, "--json")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    on, off = ev["with_adapter"], ev["without_adapter"]
    assert ev["task"] == "sequence-classification" and ev["metric"] == "accuracy"
    assert on["loss"] < off["loss"] and on["accuracy"] >= off["accuracy"]
    r = _cli("eval", bundle, "--data", held, "--checkpoint", "best")
    assert r.returncode == 0 and "per class (with adapter): greet precision" in r.stdout, r.stderr

    after = _predict(bundle)
    assert after[0]["adapter"] == "trained, step 24"
    for p in after:
        assert set(p["probabilities"]) == {"greet", "weather", "music"}
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)
    assert after[0]["probabilities"]["greet"] > before[0]["probabilities"]["greet"]
    r = _cli("predict", bundle, "--text", "hello there")
    assert r.returncode == 0 and r.stdout.split("\t")[0] == after[0]["label"], r.stderr

    r = _cli("delta", bundle, "--out", tmp_path / "d.etd", "--codec", "fp32")
    assert r.returncode == 0, r.stderr
    r = _cli("to-peft", tmp_path / "d.etd", "--bundle", bundle, "--out", tmp_path / "peft")
    assert r.returncode == 0, r.stderr
    peft = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    trained = load_file(str(bundle / "train-state" / "ckpt-00000024" / "adapter.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(peft)
    np.testing.assert_array_equal(peft["base_model.model.classifier.weight"], trained["model.classifier.weight"])
    # transformers + PEFT, mean pooled, gives the bundle's probabilities (int8 base vs fp32: close, not equal)
    theirs = _mean_pooled_peft_probabilities(tiny_bert_dir, tmp_path / "peft", ["hello there", "will it rain tomorrow"])
    ours = np.array([[p["probabilities"][n] for n in ("greet", "weather", "music")] for p in after])
    np.testing.assert_allclose(theirs, ours, atol=2e-2)

    fresh = tmp_path / "fresh"
    shutil.copytree(bundle, fresh)
    shutil.rmtree(fresh / "train-state")
    r = _cli("from-peft", tmp_path / "peft", "--bundle", fresh)
    assert r.returncode == 0, r.stderr
    again = _predict(fresh)
    for a, b in zip(again, after):
        assert a["label"] == b["label"]
        for n in a["probabilities"]:
            assert a["probabilities"][n] == pytest.approx(b["probabilities"][n], abs=1e-6)


def test_predict_refuses_a_causal_lm_bundle(tiny_bundle):
    r = _cli("predict", tiny_bundle, "--text", "hi")
    assert r.returncode == 2 and "predict needs a sequence-classification bundle" in r.stderr, r.stderr


def test_from_peft_refuses_a_folder_without_the_head(bundle, tmp_path):
    from safetensors.numpy import load_file, save_file

    r = _cli("delta", bundle, "--out", tmp_path / "d.etd", "--codec", "fp32")
    assert r.returncode == 0, r.stderr
    assert _cli("to-peft", tmp_path / "d.etd", "--bundle", bundle, "--out", tmp_path / "peft").returncode == 0
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(str(weights)).items() if "classifier" not in k}
    save_file(tensors, str(weights))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    config["modules_to_save"] = None
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    r = _cli("from-peft", tmp_path / "peft", "--bundle", bundle)
    assert r.returncode == 2 and "modules_to_save" in r.stderr and "base_model.model.classifier" in r.stderr, r.stderr


@pytest.mark.parametrize("command, expected", [
    (["generate", "--prompt", "hi"], "generate needs a causal-LM bundle"),
    (["merge", "--out", "m.onnx"], "merge folds an adapter into a generation graph"),
])
def test_generation_commands_refuse_a_classifier(export_tiny_bert, tmp_path, command, expected):
    r = _cli(command[0], export_tiny_bert(), *[str(tmp_path / a) if a.endswith(".onnx") else a for a in command[1:]])
    assert r.returncode == 2 and expected in r.stderr and "edgetune predict" in r.stderr, r.stderr
