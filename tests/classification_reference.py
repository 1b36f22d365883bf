"""The PyTorch reference for sequence classification: transformers' BertModel + PEFT LoRA, mean pooling
over the attention mask (the all-MiniLM-L6-v2 model card's), a linear head, cross-entropy, AdamW.

Written independently of edgetune's exporter: the head is PEFT's ``modules_to_save``, so the keys
PEFT reads and writes are the ones the bundle must use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def reference_classifier(model_dir: Path, manifest, tensors: dict[str, np.ndarray] | None = None):
    """A PEFT model (LoRA of the bundle's config + the head in modules_to_save); ``tensors`` by PEFT key."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from torch import nn
    from transformers import BertModel

    class MeanPooled(nn.Module):
        def __init__(self):
            super().__init__()
            # dropout 0: the bundle trains without it (its step is deterministic)
            self.bert = BertModel.from_pretrained(model_dir, add_pooling_layer=False, attn_implementation="eager",
                                                  dtype=torch.float32, hidden_dropout_prob=0.0,
                                                  attention_probs_dropout_prob=0.0)
            self.classifier = nn.Linear(self.bert.config.hidden_size, len(manifest.task_config["labels"]))

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).float()
            return self.classifier((hidden * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9))

    cfg = manifest.method["config"]
    model = get_peft_model(MeanPooled(), LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], target_modules=list(cfg["targets"]),
                                                    lora_dropout=0.0, use_rslora=cfg["use_rslora"],
                                                    modules_to_save=["classifier"]))
    if tensors is not None:
        result = set_peft_model_state_dict(model, {k: torch.tensor(v) for k, v in tensors.items()})
        missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
        if missing or result.unexpected_keys:
            raise AssertionError(f"PEFT did not take the tensors: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
    return model


def reference_logits(model, batch: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])).numpy()


def mean_pooled_probabilities(bert, classifier, model_dir: Path, texts: list[str]) -> np.ndarray:
    """Class probabilities of ``texts``: ``bert``'s last hidden state mean-pooled over the attention
    mask (the model card's pooling, as the bundle computes it), then ``classifier``, then softmax."""
    import torch
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(model_dir)(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        logits = classifier((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))
    return torch.softmax(logits, -1).numpy()


def perturbed_start(opened, rows: int = 6):
    """(examples, batch, start, start by PEFT key) for a one-step parity check on ``rows`` held-out
    intents: the bundle's initial adapter plus seeded noise (sigma 1 on the head, 0.05 elsewhere), so
    that every tensor gets a gradient and the head's prediction is not uniform."""
    from importlib import resources

    from edgetune.runtime.backend import open_backend
    from edgetune.runtime.classification import TASK

    manifest = opened.manifest
    examples, _ = TASK.load(opened, resources.files("edgetune") / "data" / "intents-heldout.jsonl", 128, False)
    batch = TASK.batch(examples[:rows], manifest.tokenizer.pad_token_id)
    rng = np.random.default_rng(0)
    start = {k: v + rng.normal(0, 1.0 if "classifier" in k else 0.05, v.shape).astype(np.float32)
             for k, v in open_backend("ort-training", opened, training=False).initial_adapter().items()}
    return examples[:rows], batch, start, {t.peft_key: start[t.graph_name] for t in manifest.trainable}


def adamw_backward(model, params: list, batch: dict[str, np.ndarray], lr: float, optimizer: dict):
    """AdamW over ``params`` (the bundle's settings) and the cross-entropy of ``model`` on ``batch``,
    backward done: (optimizer, loss), for the caller to read gradients before ``optimizer.step()``."""
    import torch

    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(optimizer["betas"]), eps=optimizer["eps"],
                            weight_decay=optimizer["weight_decay"])
    model.train()
    logits = model(torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"]))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(batch["labels"]))
    loss.backward()
    return opt, loss


def reference_step(model, batch: dict[str, np.ndarray], lr: float, optimizer: dict, gradients: dict | None = None):
    """One AdamW step on ``batch``; returns (loss, {PEFT key: updated tensor}); ``gradients`` (a dict)
    receives the step's gradients by PEFT key."""
    from peft import get_peft_model_state_dict

    opt, loss = adamw_backward(model, [p for p in model.parameters() if p.requires_grad], batch, lr, optimizer)
    if gradients is not None:
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        gradients.update({k: v.numpy() for k, v in get_peft_model_state_dict(model, state_dict=grads).items()})
    opt.step()
    return float(loss.detach()), {k: v.detach().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}


def assert_one_step_matches(opened, start: dict, batch: dict, lr: float, ref_loss: float, ref_after: dict,
                            gradients: dict, rtol: float = 1e-4) -> None:
    """One AdamW step of both backends from ``start`` against a PyTorch reference's loss and updated tensors
    (keyed by PEFT key). Updated tensors within ``rtol`` relative where the gradient is well above AdamW's
    eps (1e-8); where it is not, step 1's m / (sqrt(v) + eps) turns fp32 rounding (PyTorch's and ORT's
    kernels sum in different orders) into any fraction of that element's step, bounded by lr: checked
    against that, and such elements must be few."""
    from edgetune.runtime.backend import open_backend

    manifest = opened.manifest
    for name in ("ort-training", "portable"):
        backend = open_backend(name, opened)
        backend.set_trainable(start)
        loss = backend.train_step(batch)
        backend.optimizer_step(lr)
        after = backend.trainable()
        assert abs(loss - ref_loss) <= rtol * abs(ref_loss), name
        for t in manifest.trainable:
            ref, got = ref_after[t.peft_key], after[t.graph_name]
            clear = np.abs(gradients[t.peft_key]) > 1e-6
            scale = max(np.abs(ref).max(), 1e-12)
            assert np.abs(got - ref)[clear].max(initial=0) <= rtol * scale, (name, t.peft_key)
            assert np.abs(got - ref).max() <= lr, (name, t.peft_key)
            assert clear.mean() > 0.9, t.peft_key
