"""``edgetune eval``: the task's metrics on held-out data, with the adapter on and off.

causal-lm: loss and perplexity over the response tokens; other tasks: see their module
(``edgetune.runtime.tasks``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetune.bundle import Bundle
from edgetune.constants import IGNORE_INDEX
from edgetune.runtime.adapter_source import disabled, latest_adapter
from edgetune.runtime.backend import open_backend
from edgetune.runtime.batches import pad_batch
from edgetune.runtime.state import StateDir


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    label_tokens: int
    examples: int


def label_positions(batch: dict[str, np.ndarray]) -> int:
    """How many positions the loss averages over: labels after the causal shift that are not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def eval_loss(backend, examples, batch_size: int, pad_id: int) -> EvalResult:
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = pad_batch(examples[start:start + batch_size], pad_id)
        n = label_positions(batch)
        if n:
            total += backend.eval_loss(batch) * n  # batch loss is a mean over its n positions
            count += n
    loss = total / count if count else float("nan")
    return EvalResult(loss, math.exp(min(loss, 700.0)), count, len(examples))


def evaluate(bundle: Bundle, data: Path, *, batch_size: int = 4, max_seq_len: int = 256, threads: int = 0,
             state_dir: Path | None = None, skip_bad: bool = False, backend_name: str = "auto",
             adapter: dict[str, np.ndarray] | None = None, checkpoint: str = "latest") -> dict:
    """Evaluate with the latest (or best) trained adapter, or ``adapter``, and with the adapter off."""
    from edgetune.bundle import sha256_file
    from edgetune.runtime.tasks import get_task

    manifest = bundle.manifest
    task = get_task(manifest.task)
    examples, stats = task.load(bundle, data, max_seq_len, skip_bad)
    source = latest_adapter(bundle, state_dir, backend_name, checkpoint=checkpoint)
    backend = open_backend(backend_name, bundle, threads=threads, with_eval=True, training=False)
    if task.prepare is not None:  # e.g. dpo: reference log-probabilities (cached in the state folder)
        examples = task.prepare(bundle, backend, examples, StateDir(bundle.state_folder(state_dir)),
                                sha256_file(data), lambda m: None)
    used = adapter if adapter is not None else source.tensors
    backend.set_trainable(used)
    on = task.evaluate(bundle, backend, examples, batch_size)
    backend.set_trainable(disabled(bundle, used))
    off = task.evaluate(bundle, backend, examples, batch_size)
    return {"adapter": "given" if adapter is not None else source.origin, "task": task.name, "metric": task.metric,
            "with_adapter": on, "without_adapter": off, "data": stats.__dict__ if hasattr(stats, "__dict__") else stats}
