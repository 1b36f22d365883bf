"""The causal-LM training graph: a model wrapper that outputs its own scalar loss.

Graph inputs: input_ids (B, T) int64, attention_mask (B, T) int64, labels (B, T) int64 (IGNORE_INDEX
= -100: masked, e.g. prompt tokens and padding), position_ids (B, T) int64. Output: ``loss``, the mean
cross-entropy over the label positions after the causal shift.

Packed rows (several examples in one row): ``attention_mask`` holds segment ids — 1, 2, 3... per
example, 0 for padding — and ``position_ids`` restart at 0 for each example, so each example sees
only itself (a block-diagonal causal mask) at the rotary positions it would have alone. A plain
0/1 padding mask with positions 0..T-1 is the one-example-per-row case. Bundles exported with
``packing=False`` have the older three inputs and a 0/1 mask only. The language-model head runs only on label positions, so
prompt tokens and padding never produce (N, vocab) logits — less memory and fewer FLOPs.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from torch import nn

from edgetune.constants import IGNORE_INDEX, OPSET

INPUT_NAMES = ("input_ids", "attention_mask", "labels", "position_ids")
LEGACY_INPUT_NAMES = INPUT_NAMES[:3]  # bundles that cannot take packed rows
OUTPUT_NAMES = ("loss",)


class CausalLMLoss(nn.Module):
    """Wraps a Hugging Face ``*ForCausalLM``; parameter names become ``model.<hf name>``."""

    def __init__(self, model: nn.Module, packing: bool = True):
        super().__init__()
        self.model = model
        self.packing = packing

    def forward(self, input_ids, attention_mask, labels, position_ids=None):
        if self.packing:
            mask = segment_causal_mask(attention_mask)
            hidden = self.model.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
        else:
            mask = additive_causal_mask(attention_mask)
            hidden = self.model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        width = hidden.shape[-1]
        h = hidden[:, :-1, :].reshape(-1, width)  # (B*(T-1), H): position t predicts token t+1
        y = labels[:, 1:].reshape(-1)  # (B*(T-1),)
        keep = torch.nonzero(y != IGNORE_INDEX).squeeze(1)  # (N,) label positions only
        logits = self.model.lm_head(h.index_select(0, keep))  # (N, V)
        return nn.functional.cross_entropy(logits, y.index_select(0, keep))


def additive_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 padding mask -> (B, 1, T, T) additive mask: 0 where query t may see key s.

    Built here rather than by transformers' masking utilities, which use vmap and cannot be
    traced by the TorchScript exporter; a 4-D mask is passed through by the model unchanged.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    causal = positions[None, :] <= positions[:, None]  # (T, T): key s <= query t
    allowed = causal[None, None, :, :] & attention_mask[:, None, None, :].bool()  # (B, 1, T, T)
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(allowed, zero, torch.tensor(torch.finfo(torch.float32).min))


def segment_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids (0 = padding) -> (B, 1, T, T) additive mask, block-diagonal and causal.

    Query t sees key s when both lie in the same example (segment > 0) and s <= t. A padding
    query sees itself only, so no softmax row is empty; its output never reaches a label.
    Standard ONNX ops only (Equal, Greater, LessOrEqual, And, Or, Where).
    """
    positions = torch.arange(segments.shape[1], device=segments.device)
    causal = positions[None, :] <= positions[:, None]  # (T, T): key s <= query t
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    real = (segments > 0)[:, None, :]  # (B, 1, T): the key is a token, not padding
    itself = positions[None, :] == positions[:, None]  # (T, T)
    allowed = ((same & real & causal[None]) | itself[None])[:, None, :, :]  # (B, 1, T, T)
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(allowed, zero, torch.tensor(torch.finfo(torch.float32).min))


def dummy_batch(vocab_size: int, batch: int = 2, seq: int = 8) -> tuple[torch.Tensor, ...]:
    """A batch with masked prompt positions, so the exported graph keeps its masking path."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.int64)
    labels = input_ids.clone()
    labels[:, : seq // 2] = IGNORE_INDEX
    position_ids = torch.arange(seq).repeat(batch, 1)
    return input_ids, attention_mask, labels, position_ids


def export_training_graph(model: nn.Module, path: Path, opset: int = OPSET, packing: bool = True) -> tuple[str, ...]:
    """Export the loss graph in training mode (dropout kept as ops, no constant folding).

    Parameter names survive as initializer names (``model.model.layers.0...``), which is how the
    manifest and ``generate_artifacts`` address them. Returns the graph's input names, in order.
    """
    wrapper = CausalLMLoss(model, packing)
    names = INPUT_NAMES if packing else LEGACY_INPUT_NAMES
    dynamic = {name: {0: "batch", 1: "sequence"} for name in names}
    with torch.no_grad(), quiet_export():
        torch.onnx.export(
            wrapper,
            dummy_batch(model.config.vocab_size)[: len(names)],
            str(path),
            input_names=list(names),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=False,
            export_params=True,
            training=torch.onnx.TrainingMode.TRAINING,
            dynamo=False,
        )
    return names


@contextlib.contextmanager
def quiet_export():
    """The TorchScript exporter's tracer and deprecation warnings say nothing a user can act on."""
    with warnings.catch_warnings():
        for category in (torch.jit.TracerWarning, DeprecationWarning, FutureWarning, UserWarning):
            warnings.simplefilter("ignore", category)
        yield


def graph_name(torch_name: str) -> str:
    """Initializer name of a model parameter inside the exported training graph."""
    return f"model.{torch_name}"
