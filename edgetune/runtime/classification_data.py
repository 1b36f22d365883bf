"""Labelled text for sequence classification: ``{"text": str, "label": name | index}`` per JSONL line.

A label is one of the bundle's class names (``task_config["labels"]``, in index order) or an integer
index into them. Lines go through ``data.checked_records`` (blank lines, bad JSON, --skip-bad in one
place); a bad record names its file, line and field. Texts are tokenized with the bundle's
tokenizer, which adds the encoder's [CLS] ... [SEP]; a longer text keeps its first
``max_seq_len - 1`` tokens and its final [SEP]. Class counts, and an imbalance warning, come with
the stats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgetune.errors import BundleError, DataError
from edgetune.runtime.data import DataStats, checked_records
from edgetune.runtime.jsonl import MAX_RECORD_BYTES

IMBALANCE = 3.0  # largest / smallest class count at or above which the data is reported imbalanced


@dataclass
class LabelledText:
    input_ids: np.ndarray  # (T,) int64, [CLS] ... [SEP]
    label: int  # index into the bundle's labels


@dataclass
class ClassStats(DataStats):
    class_counts: dict[str, int] = field(default_factory=dict)  # label name -> examples, in label order
    notes: list[str] = field(default_factory=list)  # what the user should know about the data (printed by train)


def label_names(manifest) -> list[str]:
    """The bundle's class names in index order; BundleError when the manifest has none."""
    labels = (manifest.task_config or {}).get("labels")
    if (not isinstance(labels, list) or len(labels) < 2 or any(not isinstance(x, str) or not x for x in labels)
            or len(set(labels)) != len(labels)):
        raise BundleError(f"the bundle's task_config has no valid class labels ({labels!r}); "
                          "re-export it with --task sequence-classification --num-labels N.")
    return labels


def label_index(value, names: list[str], where: str) -> int:
    """A record's label (a class name or an index) -> its index; DataError naming the field otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f'{where}: field "label" must be a class name or an index, got {value!r}')
    if isinstance(value, int):
        if not 0 <= value < len(names):
            raise DataError(f'{where}: field "label" index {value} is out of range; the bundle has {len(names)} '
                            f"classes (0..{len(names) - 1}: {', '.join(names)})")
        return value
    if value not in names:
        raise DataError(f'{where}: field "label" {value!r} is not one of the bundle\'s classes ({", ".join(names)})')
    return names.index(value)


def _checker(names: list[str]):
    def check(record: dict, where: str) -> tuple[str, int]:
        for key in ("text", "label"):
            if key not in record:
                raise DataError(f'{where}: missing field "{key}" in a classification record ({{"text", "label"}})')
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise DataError(f'{where}: field "text" must be a non-empty string')
        return record["text"], label_index(record["label"], names, where)

    return check


def load_labelled(path: Path, tokenizer, names: list[str], max_seq_len: int, skip_bad: bool = False,
                  max_record_bytes: int = MAX_RECORD_BYTES) -> tuple[list[LabelledText], ClassStats]:
    """Read, check and tokenize a labelled JSONL file; the stats count classes and truncations."""
    if max_seq_len < 2:
        raise DataError(f"--max-seq-len must be at least 2 for classification ([CLS] and [SEP]), got {max_seq_len}.")
    stats = ClassStats(str(path), shape="classification")
    examples: list[LabelledText] = []
    for _, (text, label) in checked_records(path, skip_bad, stats, _checker(names), max_record_bytes):
        ids = tokenizer.encode(text).ids  # with the encoder's special tokens
        if len(ids) > max_seq_len:
            ids = ids[:max_seq_len - 1] + ids[-1:]
            stats.truncated += 1
        examples.append(LabelledText(np.array(ids, dtype=np.int64), label))
        stats.tokens += len(ids)
    stats.examples = stats.label_tokens = len(examples)
    if not examples:
        detail = f" ({stats.skipped_bad} bad lines skipped)" if stats.skipped_bad else ""
        raise DataError(f"{Path(path).name}: the file is empty or has no usable records{detail}; "
                        'give a JSONL file with {"text", "label"} records.')
    counts = np.bincount([e.label for e in examples], minlength=len(names))
    stats.class_counts = {name: int(c) for name, c in zip(names, counts)}
    stats.notes = class_notes(stats.class_counts)
    return examples, stats


def class_notes(counts: dict[str, int]) -> list[str]:
    """One line of class counts, and a warning when a class is absent or the classes are imbalanced."""
    total = sum(counts.values())
    notes = ["classes: " + ", ".join(f"{name} {c} ({100 * c / total:.0f} %)" for name, c in counts.items())]
    absent = [name for name, c in counts.items() if c == 0]
    present = [c for c in counts.values() if c]
    if absent:
        notes.append(f"no examples of {', '.join(absent)}: the model cannot learn to predict "
                     f"{'it' if len(absent) == 1 else 'them'} from this file")
    if len(present) > 1 and max(present) / min(present) >= IMBALANCE:
        notes.append(f"imbalanced: the largest class has {max(present) / min(present):.1f}x the examples of the "
                     "smallest; accuracy can look good while a small class is never predicted — watch macro-F1 "
                     "and per-class recall (`edgetune eval --json`)")
    return notes


def classification_batch(examples: list[LabelledText], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded input_ids, attention_mask (B, T) int64 and labels (B,) int64."""
    width = max(len(e.input_ids) for e in examples)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(examples), width), dtype=np.int64)
    for row, e in enumerate(examples):
        ids[row, :len(e.input_ids)], mask[row, :len(e.input_ids)] = e.input_ids, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": np.array([e.label for e in examples], dtype=np.int64)}
