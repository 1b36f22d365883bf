"""sequence-classification with bottleneck adapters (``--method adapter``) on a BERT encoder: one AdamW
step equals a plain-PyTorch reference (BertModel + bottleneck adapters where AdapterHub's BERT puts
them, mean pooling, head) on both backends; step 0 is the base; the device cycle through the CLI,
to-peft loaded by AdapterHub (adapters and head) and from-peft back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgetune.bundle import Bundle
from edgetune.methods import AdapterConfig
from tests.classification_adapter_reference import reference_adapter_classifier, reference_adapter_step
from tests.test_classification import _rel, write_rows
from tests.test_classification_cli import HELD, TRAIN
from tests.test_runtime import _cli

RTOL = 1e-4
CONFIGS = {
    "both-swish-dim8": AdapterConfig(dim=8),
    "mlp-relu-rf4": AdapterConfig(reduction_factor=4, where=("mlp",), non_linearity="relu"),
}


def _export(export_tiny_bert, name: str, **kwargs) -> Path:
    return export_tiny_bert(method="adapter", method_config=CONFIGS[name], **kwargs)


@pytest.mark.parametrize("backend_name", ["ort-training", "portable"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_adamw_step_matches_pytorch_bottleneck_reference(export_tiny_bert, tiny_bert_dir, tmp_path, name,
                                                              backend_name):
    from edgetune.runtime.backend import open_backend
    from edgetune.runtime.classification import TASK, all_logits
    from tests.classification_reference import reference_logits

    opened = Bundle.open(_export(export_tiny_bert, name, quantize="none"))
    manifest = opened.manifest
    layers = 2 * (2 if name == "both-swish-dim8" else 1)  # tiny BERT: 2 layers x adapted blocks
    assert len(manifest.trainable) == 4 * layers + 2  # down, down bias, up, up bias per block + the head
    examples, _ = TASK.load(opened, write_rows(tmp_path / "d.jsonl"), 64, False)
    backend = open_backend(backend_name, opened)
    rng = np.random.default_rng(1)  # up != 0 and a head far from its init: every tensor gets a real gradient
    start = {k: v + rng.normal(0, 0.2, v.shape).astype(np.float32) for k, v in backend.initial_adapter().items()}
    backend.set_trainable(start)
    batch = TASK.batch(examples, manifest.tokenizer.pad_token_id)
    assert batch["attention_mask"].min() == 0  # padded rows: the masking path is exercised
    lr = 1e-2
    loss = backend.train_step(batch)
    backend.optimizer_step(lr)
    after = backend.trainable()

    reference, params = reference_adapter_classifier(tiny_bert_dir, manifest,
                                                     {t.peft_key: start[t.graph_name] for t in manifest.trainable})
    np.testing.assert_allclose(all_logits(opened, start, examples, 2), reference_logits(reference, batch),
                               rtol=RTOL, atol=1e-5)  # the logits graph: the same model
    ref_loss, ref_after = reference_adapter_step(reference, params, batch, lr, manifest.optimizer)
    assert abs(loss - ref_loss) <= RTOL * abs(ref_loss)
    for t in manifest.trainable:
        assert _rel(after[t.graph_name], ref_after[t.peft_key]) <= RTOL, t.peft_key
        assert not np.allclose(after[t.graph_name], start[t.graph_name]), t.peft_key  # the step moved it


def test_exported_adapters_start_as_the_base_encoder(export_tiny_bert, tiny_bert_dir, tmp_path):
    """up = 0 at export: the logits graph with the initial tensors equals BertModel + the initial head."""
    import torch
    from transformers import BertModel

    from edgetune.runtime.adapter_source import initial_adapter
    from edgetune.runtime.classification import TASK, all_logits

    opened = Bundle.open(_export(export_tiny_bert, "both-swish-dim8", quantize="none"))
    manifest = opened.manifest
    initial = initial_adapter(opened)
    ups = [t.graph_name for t in manifest.trainable if ".adapter_up" in t.graph_name]
    assert ups and all(not initial[n].any() for n in ups)
    assert all(initial[t.graph_name].any() for t in manifest.trainable if t.graph_name.endswith("adapter_down"))
    assert manifest.method["peft_config"]["model_class"] == "BertForSequenceClassification"
    examples, _ = TASK.load(opened, write_rows(tmp_path / "d.jsonl"), 64, False)
    batch = TASK.batch(examples, manifest.tokenizer.pad_token_id)
    bert = BertModel.from_pretrained(tiny_bert_dir, add_pooling_layer=False, attn_implementation="eager").eval()
    with torch.no_grad():
        h = bert(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]))
        mask = torch.tensor(batch["attention_mask"]).unsqueeze(-1).float()
        pooled = ((h.last_hidden_state * mask).sum(1) / mask.sum(1)).numpy()
    want = pooled @ initial["model.classifier.weight"].T + initial["model.classifier.bias"]
    np.testing.assert_allclose(all_logits(opened, initial, examples, 2), want, rtol=1e-4, atol=1e-5)


def test_cli_export_train_eval_predict_delta_adapterhub_round_trip(tiny_bert_dir, tmp_path):
    from safetensors.numpy import load_file

    from edgetune.delta import read_delta

    bundle = tmp_path / "b"
    r = _cli("export", tiny_bert_dir, "--task", "sequence-classification", "--num-labels", "3", "--method", "adapter",
             "--adapter-dim", "16", "--adapter-where", "mlp,attn", "--out", bundle)
    assert r.returncode == 0, r.stderr
    manifest = Bundle.open(bundle).manifest
    assert manifest.method["name"] == "adapter" and manifest.method["config"]["dim"] == 16
    assert manifest.task_config["head_tensors"] == ["model.classifier.weight", "model.classifier.bias"]
    index = {"greet": 0, "weather": 1, "music": 2}  # --num-labels 3: classes LABEL_0..2, labels given by index
    train = write_rows(tmp_path / "train.jsonl", [(t, index.get(y, y)) for t, y in TRAIN], repeat=2)
    held = write_rows(tmp_path / "held.jsonl", [(t, index[y]) for t, y in HELD])
    r = _cli("train", bundle, "--data", train, "--eval-data", held, "--eval-every", 12, "--steps", 24,
             "--batch-size", 3, "--lr", 2e-2, "--quiet")
    assert r.returncode == 0, r.stderr
    r = _cli("eval", bundle, "--data", train, "--json")
    assert r.returncode == 0, r.stderr
    on, off = json.loads(r.stdout)["with_adapter"], json.loads(r.stdout)["without_adapter"]
    assert on["loss"] < off["loss"] and on["accuracy"] > off["accuracy"]  # it learned the training rows
    r = _cli("eval", bundle, "--data", held)
    assert r.returncode == 0 and "per class (with adapter): LABEL_0 precision" in r.stdout, r.stderr
    r = _cli("predict", bundle, "--text", "play some music", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.splitlines()[0])
    assert row["adapter"] == "trained, step 24" and set(row["probabilities"]) == {"LABEL_0", "LABEL_1", "LABEL_2"}
    assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)

    r = _cli("delta", bundle, "--out", tmp_path / "d.etd", "--codec", "fp32")
    assert r.returncode == 0, r.stderr
    delta = read_delta(tmp_path / "d.etd")
    trained = load_file(str(bundle / "train-state" / "ckpt-00000024" / "adapter.safetensors"))
    assert set(delta.tensors) == {t.peft_key for t in manifest.trainable}  # adapters and head
    for t in manifest.trainable:
        np.testing.assert_array_equal(delta.tensors[t.peft_key], trained[t.graph_name])
    assert "base_model.model.classifier.weight" in delta.tensors
    assert "bert.encoder.layer.1.attention.output.adapters.edgetune.adapter_up.weight" in delta.tensors

    r = _cli("to-peft", tmp_path / "d.etd", "--bundle", bundle, "--out", tmp_path / "hub")
    assert r.returncode == 0 and "load_adapter" in r.stdout, r.stderr
    saved = load_file(str(tmp_path / "hub" / "model_head.safetensors"))
    np.testing.assert_array_equal(saved["classifier.weight"], trained["model.classifier.weight"])
    head_config = json.loads((tmp_path / "hub" / "head_config.json").read_text())
    assert head_config["label2id"] == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}
    # AdapterHub loads adapters and head; mean pooled, it gives the bundle's probabilities (int8 base: close)
    texts = ["play some music", "hello there"]
    ours = _predict_probabilities(bundle, texts)
    np.testing.assert_allclose(_adapterhub_probabilities(tiny_bert_dir, tmp_path / "hub", texts), ours, atol=2e-2)

    fresh = tmp_path / "fresh"
    shutil.copytree(bundle, fresh, ignore=shutil.ignore_patterns("train-state"))
    r = _cli("from-peft", tmp_path / "hub", "--bundle", fresh)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(_predict_probabilities(fresh, texts), ours, atol=1e-6)
    (tmp_path / "hub" / "model_head.safetensors").unlink()
    r = _cli("from-peft", tmp_path / "hub", "--bundle", fresh, "--force")
    assert r.returncode == 2 and "model_head.safetensors" in r.stderr and "with_head=True" in r.stderr, r.stderr


def _predict_probabilities(bundle: Path, texts: list[str]) -> np.ndarray:
    r = _cli("predict", bundle, *[a for t in texts for a in ("--text", t)], "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    return np.array([[row["probabilities"][f"LABEL_{i}"] for i in range(3)] for row in rows])


def _adapterhub_probabilities(model_dir: Path, folder: Path, texts: list[str]) -> np.ndarray:
    """What an AdapterHub user gets: BertForSequenceClassification, adapters.init, load_adapter (with the
    head), scored through its encoder, mean pooling and its classifier (not the [CLS] pooler)."""
    adapters = pytest.importorskip("adapters")
    from transformers import BertForSequenceClassification

    from tests.classification_reference import mean_pooled_probabilities

    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=3, attn_implementation="eager")
    adapters.init(model)
    name = model.load_adapter(str(folder), use_safetensors=True, set_active=True)
    assert name == "edgetune" and model.active_adapters is not None
    ups = [p for n, p in model.named_parameters() if ".adapters.edgetune.adapter_up" in n]
    assert len(ups) == 8 and all(p.abs().sum() > 0 for p in ups)  # the trained adapters, not a fresh one
    model.eval()
    return mean_pooled_probabilities(model.bert, model.classifier, model_dir, texts)


def test_reference_placement_and_keys_are_adapterhubs(export_tiny_bert, tiny_bert_dir, tmp_path):
    """The plain reference equals AdapterHub ``adapters``' own BERT with the bundle's config, loaded by
    the bundle's keys: the placement and the key spelling are AdapterHub's."""
    adapters = pytest.importorskip("adapters")
    import torch
    from transformers import BertForSequenceClassification

    from edgetune.runtime.classification import TASK
    from tests.classification_reference import reference_logits

    opened = Bundle.open(_export(export_tiny_bert, "both-swish-dim8", quantize="none"))
    manifest = opened.manifest
    rng = np.random.default_rng(2)
    tensors = {t.peft_key: rng.normal(0, 0.2, t.shape).astype(np.float32) for t in manifest.trainable}
    reference, _ = reference_adapter_classifier(tiny_bert_dir, manifest, tensors)
    hub = BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3, attn_implementation="eager",
                                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    adapters.init(hub)
    config = manifest.method["peft_config"]
    hub.add_adapter(config["name"], config=adapters.AdapterConfig.load(config["config"]), set_active=True)
    state = hub.state_dict()
    hub_keys = {k for k in state if ".adapters." in k}
    ours = {k for k in tensors if ".adapters." in k}
    assert hub_keys == ours
    with torch.no_grad():
        for k in ours:
            state[k].copy_(torch.tensor(tensors[k]))
        hub.classifier.weight.copy_(torch.tensor(tensors["base_model.model.classifier.weight"]))
        hub.classifier.bias.copy_(torch.tensor(tensors["base_model.model.classifier.bias"]))
    examples, _ = TASK.load(opened, write_rows(tmp_path / "d.jsonl"), 64, False)
    batch = TASK.batch(examples, manifest.tokenizer.pad_token_id)
    hub.eval()
    with torch.no_grad():  # mean pooled through the encoder, as the bundle (not the [CLS] pooler)
        ids, mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
        h = hub.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        theirs = hub.classifier((h * m).sum(1) / m.sum(1).clamp(min=1e-9)).numpy()
    np.testing.assert_allclose(reference_logits(reference, batch), theirs, rtol=1e-5, atol=1e-5)
