"""Training data: JSONL in three shapes -> token ids and labels (prompt tokens masked with IGNORE_INDEX).

Shapes, detected per file from its first valid record:
  instruction  {"instruction", "context" (optional), "output"}  -> a user turn + an assistant turn
  chat         {"messages": [{"role", "content"}, ...]}          -> every assistant turn is trained
  text         {"text"}                                           -> every token is trained (+ eos)
Instructions and chats are rendered with the bundle's chat template. Labels cover exactly the
tokens the template adds for each assistant turn after the generation prompt (the response and
its end-of-turn token); everything else gets IGNORE_INDEX (-100).
Lines are read by ``jsonl.jsonl_lines``: at most ``MAX_RECORD_BYTES`` each, UTF-8 only. Chat roles
must be ones the bundle's template knows (``ChatTemplate.roles``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from edgetune.constants import IGNORE_INDEX
from edgetune.errors import DataError
from edgetune.runtime.chat import DEFAULT_ROLES, ChatTemplate
from edgetune.runtime.jsonl import MAX_RECORD_BYTES, jsonl_lines
SHAPES = {"instruction": ("instruction", "output"), "chat": ("messages",), "text": ("text",)}
FIX = "fix the line or pass --skip-bad to skip bad lines"


@dataclass
class Example:
    input_ids: np.ndarray  # (T,) int64
    labels: np.ndarray  # (T,) int64, IGNORE_INDEX where no loss is taken


@dataclass
class DataStats:
    path: str
    shape: str = ""
    examples: int = 0
    skipped_bad: int = 0
    truncated: int = 0
    dropped_empty: int = 0
    tokens: int = 0
    label_tokens: int = 0
    bad_lines: list[int] = field(default_factory=list)


def _shape_of(record: dict) -> str | None:
    for shape, keys in SHAPES.items():
        if keys[0] in record:
            return shape
    return None


def _check(record, shape: str, where: str, roles: tuple[str, ...]) -> list[dict] | str:
    """Validate one record; return messages (instruction/chat) or the text. Raises DataError."""
    if shape == "text":
        if not isinstance(record.get("text"), str) or not record["text"]:
            raise DataError(f'{where}: field "text" must be a non-empty string')
        return record["text"]
    if shape == "instruction":
        for key in ("instruction", "output"):
            if key not in record:
                raise DataError(f'{where}: missing field "{key}" in an instruction record')
            if not isinstance(record[key], str) or not record[key].strip():
                raise DataError(f'{where}: field "{key}" must be a non-empty string')
        context = record.get("context") or ""
        if not isinstance(context, str):
            raise DataError(f'{where}: field "context" must be a string')
        user = record["instruction"] + (f"\n\n{context}" if context.strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    messages = check_messages(record.get("messages"), where, roles)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f'{where}: a chat needs at least one message with role "assistant"')
    return messages


def check_messages(messages, where: str, roles: tuple[str, ...]) -> list[dict]:
    """A record's ``messages``: a non-empty list of {"role", "content"} strings with roles the template knows."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: field "messages" must be a non-empty list')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f'{where}: messages[{i}] needs string fields "role" and "content"')
        if m["role"] not in roles:
            raise DataError(f"{where}: messages[{i}] has role {m['role']!r}; the chat template knows the roles "
                            f"{', '.join(roles)}")
    return messages


def checked_records(path: Path, skip_bad: bool, stats: DataStats, check,
                    max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, object]]:
    """Yield (line number, ``check(record, where)``) for every JSON-object line that ``check`` accepts.

    Shared by every task's reader. Blank lines are passed over; a line that is not a JSON object, or
    that ``check`` refuses with a DataError, stops the read naming file and line or, with
    ``skip_bad``, is counted in ``stats`` and skipped.
    """
    path = Path(path)
    lines = jsonl_lines(path, max_record_bytes)
    try:
        for number, line in lines:
            if isinstance(line, str) and not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                if isinstance(line, DataError):
                    raise line
                content = check(_json_object(line, where), where)
            except DataError as exc:
                if not skip_bad:
                    raise DataError(f"{exc}; {FIX}.") from None
                stats.skipped_bad += 1
                stats.bad_lines.append(number)
                continue
            yield number, content
    finally:
        lines.close()  # stop reading (and close the file) as soon as the caller stops


def _json_object(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise DataError(f"{where}: not usable JSON ({exc})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object")
    return record


def read_records(path: Path, skip_bad: bool = False, stats: DataStats | None = None,
                 roles: tuple[str, ...] = DEFAULT_ROLES,
                 max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, str, object]]:
    """Yield (line number, shape, checked content) for every good record of a JSONL file."""
    stats = stats or DataStats(str(path))
    file_shape: list[str] = []  # the shape of the file's first good record

    def check(record: dict, where: str) -> tuple[str, object]:
        this = _shape_of(record)
        if this is None:
            raise DataError(f'{where}: unknown record shape; need "instruction"+"output", "messages", or "text"')
        if file_shape and this != file_shape[0]:
            raise DataError(f"{where}: a {this} record in a file of {file_shape[0]} records; keep one shape per file")
        content = _check(record, this, where, roles)
        file_shape[:] = [this]
        return this, content

    for number, (shape, content) in checked_records(path, skip_bad, stats, check, max_record_bytes):
        stats.shape = shape
        yield number, shape, content


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def tokenize_chat(messages: list[dict], tokenizer, template: ChatTemplate) -> tuple[list[int], list[int]]:
    """Token ids of the rendered chat and labels covering each assistant turn's tokens only."""
    full_text = template.render(messages, add_generation_prompt=False)
    ids = _encode(tokenizer, full_text)
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _encode(tokenizer, template.render(messages[:i], add_generation_prompt=True))
        upto = _encode(tokenizer, template.render(messages[: i + 1], add_generation_prompt=False))
        if ids[: len(upto)] != upto or upto[: len(prompt)] != prompt:
            start, end = _char_span(tokenizer, full_text, template, messages, i)
        else:
            start, end = len(prompt), len(upto)
        labels[start:end] = ids[start:end]
    return ids, labels


def _char_span(tokenizer, full_text, template, messages, i) -> tuple[int, int]:
    """Token span of turn i by character offsets, when token prefixes do not line up (BPE merges)."""
    lo = len(template.render(messages[:i], add_generation_prompt=True))
    hi = len(template.render(messages[: i + 1], add_generation_prompt=False))
    offsets = tokenizer.encode(full_text, add_special_tokens=False).offsets
    inside = [k for k, (a, b) in enumerate(offsets) if a >= lo and b <= hi and b > a]
    return (inside[0], inside[-1] + 1) if inside else (0, 0)


def load_examples(path: Path, tokenizer, template: ChatTemplate, max_seq_len: int,
                  skip_bad: bool = False, max_record_bytes: int = MAX_RECORD_BYTES) -> tuple[list[Example], DataStats]:
    """Read, render, tokenize, mask and truncate a JSONL file."""
    stats = DataStats(str(path))
    examples: list[Example] = []
    eos = template.eos_token
    eos_id = tokenizer.token_to_id(eos) if eos else None
    for _, shape, content in read_records(path, skip_bad, stats, template.roles, max_record_bytes):
        if shape == "text":
            ids = _encode(tokenizer, content) + ([eos_id] if eos_id is not None else [])
            labels = list(ids)
        else:
            ids, labels = tokenize_chat(content, tokenizer, template)
        if len(ids) > max_seq_len:
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            stats.truncated += 1
        if sum(1 for x in labels[1:] if x != IGNORE_INDEX) == 0:  # nothing to learn after the causal shift
            stats.dropped_empty += 1
            continue
        examples.append(Example(np.array(ids, dtype=np.int64), np.array(labels, dtype=np.int64)))
        stats.tokens += len(ids)
        stats.label_tokens += sum(1 for x in labels if x != IGNORE_INDEX)
    stats.examples = len(examples)
    if not examples:
        detail = f" ({stats.skipped_bad} bad lines skipped, {stats.dropped_empty} with no label tokens)" if stats.skipped_bad or stats.dropped_empty else ""
        raise DataError(f"{Path(path).name}: the file is empty or has no usable records{detail}; "
                        "give a JSONL file with instruction, chat or text records.")
    return examples, stats


def prompt_ids(messages: list[dict], tokenizer, template: ChatTemplate) -> np.ndarray:
    """Token ids of a conversation rendered up to the assistant's turn (for generation)."""
    return np.array(_encode(tokenizer, template.render(messages, add_generation_prompt=True)), dtype=np.int64)
