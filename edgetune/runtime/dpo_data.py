"""Preference data for ``--task dpo``: JSONL records -> (chosen, rejected) token rows.

One record per line::

    {"prompt": "...", "chosen": "...", "rejected": "..."}
    {"messages": [{"role": "user", "content": "..."}, ...], "chosen": "...", "rejected": "..."}

``prompt`` is one user turn; ``messages`` is the conversation so far (it must not end with an
assistant turn). ``chosen`` and ``rejected`` are the two candidate assistant replies, each a string
or a one-message list ``[{"role": "assistant", "content": "..."}]``. Each reply is rendered after
the conversation with the bundle's chat template; its labels cover only that reply's tokens (and
its end-of-turn token), so the sequence log-probability is summed over response tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from edgetune.constants import IGNORE_INDEX
from edgetune.errors import DataError
from edgetune.runtime.chat import ChatTemplate
from edgetune.runtime.data import DataStats, Example, _encode, check_messages, checked_records, tokenize_chat
from edgetune.runtime.jsonl import MAX_RECORD_BYTES

REPLIES = ("chosen", "rejected")


@dataclass
class PreferencePair:
    chosen: Example
    rejected: Example
    ref: tuple[float, float] | None = None  # reference log-probabilities (chosen, rejected), once computed


def _reply(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant":
        value = value[0].get("content")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f'{where}: field "{key}" must be a non-empty string (or one assistant message)')
    return value


def _conversation(record: dict, where: str, roles: tuple[str, ...]) -> list[dict]:
    if "prompt" in record:
        if "messages" in record:
            raise DataError(f'{where}: give "prompt" or "messages", not both')
        if not isinstance(record["prompt"], str) or not record["prompt"].strip():
            raise DataError(f'{where}: field "prompt" must be a non-empty string')
        return [{"role": "user", "content": record["prompt"]}]
    if "messages" not in record:
        raise DataError(f'{where}: missing field "prompt" (or "messages") in a preference record')
    messages = check_messages(record["messages"], where, roles)
    if messages[-1]["role"] == "assistant":
        raise DataError(f'{where}: field "messages" ends with an assistant turn; the replies go in "chosen" and "rejected"')
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_preferences(path: Path, skip_bad: bool, stats: DataStats, roles: tuple[str, ...],
                     max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[list[dict], str, str]]:
    """Yield (conversation, chosen, rejected) for every good record; bad ones raise (or are counted)."""

    def check(record: dict, where: str) -> tuple[list[dict], str, str]:
        conversation = _conversation(record, where, roles)
        chosen, rejected = (_reply(record, key, where) for key in REPLIES)
        return conversation, chosen, rejected

    for _, item in checked_records(path, skip_bad, stats, check, max_record_bytes):
        yield item


def response_row(conversation: list[dict], reply: str, tokenizer, template: ChatTemplate) -> tuple[list[int], list[int]]:
    """Token ids of conversation + reply, labels on the reply's tokens only (earlier assistant turns masked)."""
    ids, labels = tokenize_chat([*conversation, {"role": "assistant", "content": reply}], tokenizer, template)
    prompt = len(_encode(tokenizer, template.render(conversation, add_generation_prompt=True)))
    labels[:prompt] = [IGNORE_INDEX] * min(prompt, len(labels))
    return ids, labels


def _example(ids: list[int], labels: list[int], max_seq_len: int) -> tuple[Example, bool]:
    cut = len(ids) > max_seq_len
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return Example(np.array(ids, dtype=np.int64), np.array(labels, dtype=np.int64)), cut


def load_preferences(path: Path, tokenizer, template: ChatTemplate, max_seq_len: int, skip_bad: bool = False,
                     max_record_bytes: int = MAX_RECORD_BYTES) -> tuple[list[PreferencePair], DataStats]:
    """Read, render, tokenize and truncate a preference file. A pair whose chosen or rejected reply
    has no label token left after truncation is dropped (counted in ``dropped_empty``)."""
    stats = DataStats(str(path), shape="preference")
    pairs: list[PreferencePair] = []
    for conversation, chosen, rejected in read_preferences(path, skip_bad, stats, template.roles, max_record_bytes):
        rows = [_example(*response_row(conversation, reply, tokenizer, template), max_seq_len) for reply in (chosen, rejected)]
        stats.truncated += sum(cut for _, cut in rows)
        if any(not (e.labels[1:] != IGNORE_INDEX).any() for e, _ in rows):
            stats.dropped_empty += 1
            continue
        pairs.append(PreferencePair(rows[0][0], rows[1][0]))
        for e, _ in rows:
            stats.tokens += len(e.input_ids)
            stats.label_tokens += int((e.labels != IGNORE_INDEX).sum())
    stats.examples = len(pairs)
    if not pairs:
        detail = f" ({stats.skipped_bad} bad lines skipped, {stats.dropped_empty} with no reply tokens)" \
            if stats.skipped_bad or stats.dropped_empty else ""
        raise DataError(f"{Path(path).name}: the file is empty or has no usable preference records{detail}; "
                        'give a JSONL file with {"prompt" or "messages", "chosen", "rejected"} per line.')
    return pairs, stats
