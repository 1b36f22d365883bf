"""The PyTorch reference for bottleneck adapters in a BERT classifier, written without edgetune's layers:
transformers' ``BertModel`` with plain-PyTorch bottleneck adapters inserted where AdapterHub's BERT
puts them (``BertSelfOutput`` / ``BertOutput``: after the dense projection, before ``LayerNorm(h + x)``),
mean pooling over the attention mask, a linear head, cross-entropy, torch's AdamW.

Tensors are addressed by the bundle's ``peft_key`` (AdapterHub's key spelling for
``BertForSequenceClassification``; the head ``base_model.model.classifier.{weight,bias}``), which this
module parses itself, so a wrong key in the manifest fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

_KEY = re.compile(r"^bert\.encoder\.layer\.(?P<layer>\d+)\.(?P<place>attention\.output|output)\.adapters\.edgetune\."
                  r"adapter_(?P<proj>down\.0|up)\.(?P<kind>weight|bias)$")
HEAD_KEYS = {"base_model.model.classifier.weight": "weight", "base_model.model.classifier.bias": "bias"}


def _bottleneck_class():
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        """h -> h + up(act(down(h))), AdapterHub's ``Adapter`` without layer norms, scaling 1."""

        def __init__(self, hidden: int, dim: int, activation: str):
            super().__init__()
            self.down = nn.Linear(hidden, dim)
            self.up = nn.Linear(dim, hidden)
            self.act = {"swish": nn.SiLU(), "relu": nn.ReLU()}[activation]

        def forward(self, h):
            return h + self.up(self.act(self.down(h)))

    class WithAdapter(nn.Module):
        """BertSelfOutput / BertOutput with the bottleneck between dense and the residual LayerNorm."""

        def __init__(self, block: nn.Module, adapter: nn.Module):
            super().__init__()
            self.block, self.adapter = block, adapter

        def forward(self, hidden_states, input_tensor):
            h = self.block.dropout(self.block.dense(hidden_states))
            return self.block.LayerNorm(self.adapter(h) + input_tensor)

    return Bottleneck, WithAdapter, torch


def reference_adapter_classifier(model_dir: Path, manifest, tensors: dict[str, np.ndarray]):
    """(model, {peft key: parameter}): the reference with ``tensors`` (by peft key) loaded; every key
    must name a parameter and every trainable parameter must be given."""
    Bottleneck, WithAdapter, torch = _bottleneck_class()
    from torch import nn
    from transformers import BertModel

    cfg = manifest.method["config"]
    bert = BertModel.from_pretrained(model_dir, add_pooling_layer=False, attn_implementation="eager",
                                     dtype=torch.float32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hidden = bert.config.hidden_size
    dim = cfg["dim"] or (hidden // cfg["reduction_factor"] if cfg["reduction_factor"] else 16)
    for p in bert.parameters():
        p.requires_grad_(False)
    params: dict[str, nn.Parameter] = {}
    for i, layer in enumerate(bert.encoder.layer):
        for where, owner, attr, place in (("attn", layer.attention, "output", "attention.output"),
                                          ("mlp", layer, "output", "output")):
            if where not in cfg["where"]:
                continue
            adapter = Bottleneck(hidden, dim, cfg["non_linearity"])
            setattr(owner, attr, WithAdapter(getattr(owner, attr), adapter))
            for proj, linear in (("down.0", adapter.down), ("up", adapter.up)):
                for kind in ("weight", "bias"):
                    params[f"bert.encoder.layer.{i}.{place}.adapters.edgetune.adapter_{proj}.{kind}"] = getattr(linear, kind)

    class MeanPooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert
            self.classifier = nn.Linear(hidden, len(manifest.task_config["labels"]))

        def forward(self, input_ids, attention_mask):
            h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).float()
            return self.classifier((h * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9))

    model = MeanPooled()
    params.update({key: getattr(model.classifier, attr) for key, attr in HEAD_KEYS.items()})
    bad = [k for k in tensors if k not in params or (k not in HEAD_KEYS and not _KEY.match(k))]
    missing = sorted(set(params) - set(tensors))
    if bad or missing:
        raise AssertionError(f"keys do not fit the reference: unknown {bad[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(torch.tensor(value))
    return model, params


def reference_adapter_step(model, params: dict, batch: dict[str, np.ndarray], lr: float, optimizer: dict,
                           gradients: dict | None = None):
    """One AdamW step on ``batch``: (loss, {peft key: updated tensor}); ``gradients`` (a dict) receives
    the step's gradients by peft key."""
    from tests.classification_reference import adamw_backward

    opt, loss = adamw_backward(model, list(params.values()), batch, lr, optimizer)
    if gradients is not None:
        gradients.update({k: p.grad.detach().numpy().copy() for k, p in params.items()})
    opt.step()
    return float(loss.detach()), {k: p.detach().numpy().copy() for k, p in params.items()}
