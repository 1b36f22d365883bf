"""Training steps on real instruction data: edgetune packed vs PyTorch+PEFT padded, same examples per step.

Both workers tokenize the data file with edgetune's own pipeline (the bundle's tokenizer and chat
template, labels on the responses only), shuffle it with one seed and cut it into groups of
``examples`` examples. Step k of both trainers trains on group k:

  edgetune      the group packed into rows of ``max_seq_len`` tokens (runtime/packing.py), one batch
  PyTorch+PEFT  the group as one batch padded to its longest example (dynamic padding, attention
                mask 0/1), transformers' own loss

Useful tokens are the examples' tokens (prompt and response, no padding): the same count for both.
"""

from __future__ import annotations

import numpy as np

SEED = 0


def groups(bundle_path: str, data: str, examples: int, count: int, max_seq_len: int):
    """``count`` groups of ``examples`` examples (cycling through the shuffled file), and the pad id."""
    from edgetune.bundle import Bundle
    from edgetune.runtime.data import load_examples
    from edgetune.runtime.text import load_text

    bundle = Bundle.open(bundle_path, verify=False)
    tokenizer, template = load_text(bundle)
    loaded, _ = load_examples(data, tokenizer, template, max_seq_len)
    order = np.random.default_rng(SEED).permutation(len(loaded))
    flat = [loaded[order[i % len(order)]] for i in range(examples * count)]
    return [flat[k * examples:(k + 1) * examples] for k in range(count)], bundle.manifest.tokenizer.pad_token_id


def edgetune_batches(a: dict) -> list[dict]:
    from edgetune.runtime.packing import collate, pack_rows

    out = []
    chunks, pad = groups(a["bundle"], a["data"], a["examples"], a["warmup"] + a["steps"], a["max_seq_len"])
    for chunk in chunks:
        rows = pack_rows([len(e.input_ids) for e in chunk], range(len(chunk)), a["max_seq_len"])
        out.append(collate(chunk, rows, pad))
    return out


def padded_batches(a: dict) -> list[dict]:
    from edgetune.runtime.batches import pad_batch

    chunks, pad = groups(a["bundle"], a["data"], a["examples"], a["warmup"] + a["steps"], a["max_seq_len"])
    return [{k: v for k, v in pad_batch(chunk, pad).items() if k != "position_ids"} for chunk in chunks]


def token_counts(batches: list[dict]) -> dict:
    """Per batch: real tokens (attention mask / segment id > 0) and row tokens (rows x width)."""
    return {"real_tokens": [int((b["attention_mask"] > 0).sum()) for b in batches],
            "row_tokens": [int(b["input_ids"].size) for b in batches],
            "shapes": [list(b["input_ids"].shape) for b in batches]}


def stepper(batches: list, step_one):
    """A ``step()`` for workers.measure that walks through ``batches`` in order."""
    it = iter(batches)
    return lambda: step_one(next(it))
