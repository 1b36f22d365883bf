"""The DPO training graph: policy sequence log-probabilities in, the DPO loss out.

Graph inputs: input_ids, attention_mask, labels (R, T) int64 with R = 2P rows — the P chosen
responses first, then the P rejected ones, pair i in rows i and P + i — and ref_logps (R,) float32,
the reference model's summed response log-probabilities of the same rows (computed once on the
device with the adapter off, ``edgetune.runtime.dpo``). Output ``loss``:

    mean_i  -log sigmoid(beta * ((pi(c_i) - ref(c_i)) - (pi(r_i) - ref(r_i))))

where pi(x) is the sum of the policy's log-probabilities over x's label tokens (the response;
IGNORE_INDEX elsewhere). As in the causal-LM graph, the LM head runs on label positions only; the
per-row sums are a (R, N) 0/1 matrix times the (N,) token log-probabilities, so the graph is
ordinary ONNX ops (SoftmaxCrossEntropyLoss without reduction, MatMul, Relu, Exp, Log) and their gradients.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from edgetune.constants import IGNORE_INDEX, OPSET
from edgetune.export.training_graph import additive_causal_mask, dummy_batch, quiet_export

INPUT_NAMES = ("input_ids", "attention_mask", "labels", "ref_logps")
OUTPUT_NAMES = ("loss",)


def sequence_logps(model: nn.Module, input_ids, attention_mask, labels) -> torch.Tensor:
    """(R, T) rows -> (R,) summed log-probabilities of each row's label tokens (after the causal shift)."""
    mask = additive_causal_mask(attention_mask)
    hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (R, T, H)
    rows, width = hidden.shape[0], hidden.shape[-1]
    h = hidden[:, :-1, :].reshape(-1, width)  # (R*(T-1), H): position t predicts token t+1
    y = labels[:, 1:].reshape(-1)  # (R*(T-1),)
    keep = torch.nonzero(y != IGNORE_INDEX).squeeze(1)  # (N,) label positions only
    logits = model.lm_head(h.index_select(0, keep))  # (N, V)
    token_logps = -nn.functional.cross_entropy(logits, y.index_select(0, keep), reduction="none")  # (N,)
    row_of = torch.div(keep, labels.shape[1] - 1, rounding_mode="floor")  # (N,) which row each position is in
    member = (row_of[None, :] == torch.arange(rows)[:, None]).to(token_logps.dtype)  # (R, N)
    # (R, N) @ (N, 1): with a 1-D right operand, ONNX Runtime's MatMul gradient came out wrong
    return (member @ token_logps[:, None]).squeeze(1)  # (R,)


class DPOLoss(nn.Module):
    """Wraps a Hugging Face ``*ForCausalLM``; parameter names become ``model.<hf name>``."""

    def __init__(self, model: nn.Module, beta: float):
        super().__init__()
        self.model = model
        self.beta = float(beta)

    def forward(self, input_ids, attention_mask, labels, ref_logps):
        logps = sequence_logps(self.model, input_ids, attention_mask, labels)  # (R,)
        ratios = (logps - ref_logps).reshape(2, -1)  # (2, P): row 0 chosen, row 1 rejected
        margin = ratios[:1] - ratios[1:]  # (1, P)
        losses = softplus(-self.beta * margin)  # (1, P); softplus(-x) = -log sigmoid(x)
        # sum / P rather than mean: ORT's ReduceMean gradient uses its contrib op Scale, which the
        # portable (stock onnxruntime) graph cannot run
        return losses.sum() / margin.shape[1]


def softplus(z: torch.Tensor) -> torch.Tensor:
    """log(1 + e^z) without overflow, from ops ONNX Runtime can differentiate (it has no Softplus
    gradient): relu(z) + log(1 + e^-|z|), with |z| = relu(z) + relu(-z)."""
    pos, neg = torch.relu(z), torch.relu(-z)
    return pos + torch.log(1 + torch.exp(-(pos + neg)))


def export_dpo_graph(model: nn.Module, path: Path, beta: float) -> None:
    """Export the DPO loss graph in training mode (as ``training_graph.export_training_graph``)."""
    wrapper = DPOLoss(model, beta)
    input_ids, attention_mask, labels = dummy_batch(model.config.vocab_size, batch=4)[:3]  # DPO rows are not packed
    ref = torch.zeros(4, dtype=torch.float32)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES[:3]}
    dynamic["ref_logps"] = {0: "batch"}
    with torch.no_grad(), quiet_export():
        torch.onnx.export(
            wrapper, (input_ids, attention_mask, labels, ref), str(path),
            input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic,
            opset_version=OPSET, do_constant_folding=False, export_params=True,
            training=torch.onnx.TrainingMode.TRAINING, dynamo=False,
        )
