"""The seam between the training loop and what a task trains on: a name -> ``Task`` registry.

A task (the manifest's ``task``) says how a data file becomes examples, how examples become a
batch for the bundle's training graph, how held-out examples are scored, and which score picks the
best checkpoint (``rank``: larger is better, compared as tuples). Task modules are imported only
when their task is used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from edgetune.errors import BundleError

if TYPE_CHECKING:
    from edgetune.bundle import Bundle


@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # the evaluation metric the best checkpoint is chosen by (shown in messages)
    # (bundle, path, max_seq_len, skip_bad) -> (examples, DataStats)
    load: Callable[["Bundle", Path, int, bool], tuple[list, object]]
    # (examples, pad_id) -> batch: graph input name -> array
    batch: Callable[[list, int], dict]
    # (bundle, backend, examples, batch_size) -> metrics (numbers; "loss" always among them)
    evaluate: Callable[..., dict]
    # metrics -> tuple; a larger tuple is a better checkpoint
    rank: Callable[[dict], tuple]
    # (bundle, backend, examples, state_dir: StateDir, data_sha256, log) -> examples ready to batch
    # (dpo: reference log-probabilities attached); None: nothing to prepare
    prepare: Callable[..., list] | None = None


_TASKS: dict[str, str] = {
    "causal-lm": "edgetune.runtime.task_causal:TASK",
    "dpo": "edgetune.runtime.dpo:TASK",
    "sequence-classification": "edgetune.runtime.classification:TASK",
}


def task_names() -> list[str]:
    return list(_TASKS)


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise BundleError(f"the bundle's task {name!r} is not known to this edgetune (it knows {', '.join(_TASKS)}); "
                          "update edgetune or re-export the bundle.")
    module, _, attr = _TASKS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
