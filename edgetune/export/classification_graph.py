"""Sequence classification with a BERT-family encoder: the model, its training graph, its logits graph.

The model (``MeanPoolClassifier``) is the encoder (``transformers.BertModel``, no pooler) plus a
linear head, named as ``BertForSequenceClassification`` names them (``bert.*``, ``classifier``) so
PEFT's keys line up with that class. What it computes follows all-MiniLM-L6-v2's model card, NOT
``BertForSequenceClassification`` (which feeds [CLS] through its tanh pooler):

    h = bert(input_ids, attention_mask).last_hidden_state        # (B, T, H)
    pooled = sum_t(h * mask) / max(sum_t(mask), 1e-9)            # (B, H) mean over real tokens
    logits = pooled @ W^T + b                                    # (B, C)
    loss = mean cross-entropy(logits, labels)                    # labels (B,) int64

The head starts small: W ~ N(0, 0.02) from a fixed seed (transformers' BERT initializer range), b = 0,
so the encoder's adapter gets a gradient from the first step (a zero W would block it).
Dropout is 0 everywhere (the config's 0.1 is switched off), so a step is deterministic and equals
the PyTorch reference.

Training graph inputs: input_ids, attention_mask (B, T) int64, labels (B,) int64 -> ``loss``.
Logits graph (``classifier_model.onnx``, stock onnxruntime): input_ids, attention_mask and every
trainable tensor as a float32 input (the device feeds its current adapter) -> ``logits`` (B, C).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgetune.constants import OPSET
from edgetune.export.training_graph import graph_name, quiet_export

INPUT_NAMES = ("input_ids", "attention_mask", "labels")
LOGITS_INPUTS = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("loss",)
LOGITS = "logits"
HEAD = "classifier"  # the head's module name: BertForSequenceClassification's, and PEFT's modules_to_save
HEAD_INIT_STD = 0.02
ENCODER_TYPES = ("bert",)  # model types whose encoder loads as transformers.BertModel


class MeanPoolClassifier(nn.Module):
    """``bert`` (a BertModel without pooler) + ``classifier`` (Linear hidden -> num_labels)."""

    def __init__(self, bert: nn.Module, num_labels: int, seed: int = 0):
        super().__init__()
        self.bert = bert
        self.config = bert.config
        self.classifier = nn.Linear(bert.config.hidden_size, num_labels)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.classifier.weight.normal_(0.0, HEAD_INIT_STD, generator=generator)
            self.classifier.bias.zero_()

    def get_output_embeddings(self) -> nn.Module:
        """The output layer, so LoRA's all-linear leaves it out (as PEFT leaves out modules_to_save)."""
        return self.classifier

    def forward(self, input_ids, attention_mask):  # (B, T), (B, T) -> (B, C)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return self.classifier(mean_pool(hidden, attention_mask))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H): the model card's mean pooling over the attention mask."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)


class ClassificationLoss(nn.Module):
    """Wraps a ``MeanPoolClassifier``; parameter names become ``model.<name>`` (``graph_name``)."""

    def __init__(self, model: MeanPoolClassifier):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        return nn.functional.cross_entropy(self.model(input_ids, attention_mask), labels)


class _Logits(nn.Module):
    def __init__(self, model: MeanPoolClassifier):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids, attention_mask)


def _dummy(model: MeanPoolClassifier, batch: int = 2, seq: int = 8):
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.int64)
    attention_mask[1, seq // 2:] = 0  # a padded row keeps the masking path in the trace
    labels = torch.zeros(batch, dtype=torch.int64)
    return input_ids, attention_mask, labels


def _export(wrapper: nn.Module, args, path: Path, inputs, outputs, dynamic, training: bool) -> None:
    with torch.no_grad(), quiet_export():
        torch.onnx.export(
            wrapper, args, str(path), input_names=list(inputs), output_names=list(outputs), dynamic_axes=dynamic,
            opset_version=OPSET, do_constant_folding=False, export_params=True,
            training=torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL, dynamo=False,
        )


def export_classification_graph(model: MeanPoolClassifier, path: Path) -> tuple[str, ...]:
    """The loss graph in training mode (as ``training_graph.export_training_graph``); returns its input names."""
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
               "labels": {0: "batch"}}
    _export(ClassificationLoss(model), _dummy(model), path, INPUT_NAMES, OUTPUT_NAMES, dynamic, training=True)
    return INPUT_NAMES


def export_logits_graph(model: MeanPoolClassifier, trainable_torch_names: list[str], path: Path,
                        quantize: bool) -> dict[str, str]:
    """Write the logits graph; the trainable tensors become float32 inputs named by their graph names.

    ``quantize``: frozen 2-D fp32 weights stored int8 per row, as in the training graph. Returns
    input name -> graph name (the same names: the wrapper prefixes ``model.`` as the loss graph's does).
    """
    import onnx
    from onnx import TensorProto, helper

    from edgetune.export.quantize import quantize_graph
    from edgetune.onnx_graph import save_model

    raw = path.with_suffix(".raw.onnx")
    dynamic = {name: {0: "batch", 1: "sequence"} for name in LOGITS_INPUTS}
    dynamic[LOGITS] = {0: "batch"}
    # Distinct values while tracing: the exporter merges equal initializers (the all-zero lora_B's)
    # into one, which would leave no input per tensor; the real values are put back after.
    params = [model.get_parameter(n) for n in trainable_torch_names]
    saved = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(1234)
    try:
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        _export(_Logits(model), _dummy(model)[:2], raw, LOGITS_INPUTS, (LOGITS,), dynamic, training=False)
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
    proto = onnx.load(str(raw))
    raw.unlink()
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    names = [graph_name(n) for n in trainable_torch_names]
    missing = [n for n in names if n not in inits]
    if missing:  # the exporter folded or renamed a declared tensor: a bug, not a user error
        raise RuntimeError(f"trainable tensors missing from the logits graph: {missing[:3]}")
    for name in names:
        init = inits[name]
        graph.initializer.remove(init)
        graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(init.dims)))
    if quantize:
        frozen = [t.name for t in graph.initializer if len(t.dims) == 2 and t.data_type == TensorProto.FLOAT]
        quantize_graph(proto, frozen)
    save_model(proto, path)
    return {name: name for name in names}


def load_encoder(folder: Path, num_labels: int, seed: int = 0) -> MeanPoolClassifier:
    """The encoder at ``folder`` (fp32, eager attention, dropout 0) with a fresh head of ``num_labels``."""
    from transformers import BertModel

    bert = BertModel.from_pretrained(folder, add_pooling_layer=False, attn_implementation="eager", dtype="float32",
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = MeanPoolClassifier(bert, num_labels, seed)
    model.eval()
    return model
