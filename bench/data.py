"""The one fixed batch both trainers train on, and how many of its positions carry a loss."""

from __future__ import annotations

import numpy as np

SEED = 0


def make_batch(vocab: int, batch: int, seq: int, prompt_fraction: float) -> dict[str, np.ndarray]:
    """Random token ids in the vocabulary, attention mask of ones, labels = input_ids.

    ``prompt_fraction`` of each row (its first tokens) gets label -100, like the prompt part of
    instruction data: no loss is taken there.
    """
    ids = np.random.default_rng(SEED).integers(0, vocab, (batch, seq)).astype(np.int64)  # (B, T)
    labels = ids.copy()
    labels[:, : prompt_tokens(seq, prompt_fraction)] = -100
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def prompt_tokens(seq: int, prompt_fraction: float) -> int:
    return int(seq * prompt_fraction)


def label_positions(labels: np.ndarray) -> int:
    """Positions whose logits enter the loss: position t predicts labels[t + 1] (causal shift)."""
    return int((labels[:, 1:] != -100).sum())
