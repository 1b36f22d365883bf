"""Data pipeline: record shapes, prompt masking, errors that name file/line/field, batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgetune.errors import DataError
from edgetune.runtime.batches import BatchPlan, pad_batch
from edgetune.runtime.chat import ChatTemplate
from edgetune.runtime.data import Example, load_examples
from tests.tiny_tokenizer import CHATML_TEMPLATE, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def template():
    return ChatTemplate(CHATML_TEMPLATE, None, "<|im_end|>")


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _labelled_text(tok, ex: Example) -> str:
    return tok.decode([int(i) for i, l in zip(ex.input_ids, ex.labels) if l != -100], skip_special_tokens=False)


def test_instruction_masks_prompt_and_trains_response(tmp_path, tok, template):
    path = _write(tmp_path / "i.jsonl", [{"instruction": "Say hello.", "context": "Be brief.", "output": "hello there"}])
    (ex,), stats = load_examples(path, tok, template, max_seq_len=256)
    rendered = tok.decode([int(i) for i in ex.input_ids], skip_special_tokens=False)
    assert rendered == "<|im_start|>user\nSay hello.\n\nBe brief.<|im_end|>\n<|im_start|>assistant\nhello there<|im_end|>\n"
    # exactly the response and its end-of-turn token carry labels
    assert _labelled_text(tok, ex) == "hello there<|im_end|>\n"
    first = int(np.argmax(ex.labels != -100))
    assert (ex.labels[:first] == -100).all() and (ex.labels[first:] == ex.input_ids[first:]).all()
    assert stats.shape == "instruction" and stats.examples == 1


def test_chat_trains_every_assistant_turn_only(tmp_path, tok, template):
    chat = {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "apple"},
                         {"role": "user", "content": "Another."}, {"role": "assistant", "content": "pear"}]}
    (ex,), stats = load_examples(_write(tmp_path / "c.jsonl", [chat]), tok, template, 256)
    assert _labelled_text(tok, ex) == "apple<|im_end|>\npear<|im_end|>\n"
    assert stats.shape == "chat"


def test_text_trains_every_token(tmp_path, tok, template):
    (ex,), stats = load_examples(_write(tmp_path / "t.jsonl", [{"text": "one two three"}]), tok, template, 256)
    assert (ex.labels == ex.input_ids).all() and ex.input_ids[-1] == tok.token_to_id("<|im_end|>")


@pytest.mark.parametrize("rows, message", [
    ([{"instruction": "a", "output": "b"}, '{"instruction": "a", '], 'bad.jsonl line 2: not valid JSON'),
    ([{"instruction": "a", "output": "b"}, {"instruction": "a"}], 'bad.jsonl line 2: missing field "output"'),
    ([{"instruction": "a", "output": "b"}, {"text": "x"}], "bad.jsonl line 2: a text record in a file of instruction records"),
    ([{"messages": [{"role": "user"}]}], 'bad.jsonl line 1: messages[0] needs string fields "role" and "content"'),
    ([{"prompt": "x"}], "bad.jsonl line 1: unknown record shape"),
    ([{"text": ""}], 'bad.jsonl line 1: field "text" must be a non-empty string'),
    ([], "bad.jsonl: the file is empty"),
])
def test_bad_records_name_file_line_and_field(tmp_path, tok, template, rows, message):
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_examples(path, tok, template, 256)
    assert message in str(err.value)
    if len(rows) == 2:  # one good line: --skip-bad keeps it and counts the bad one
        examples, stats = load_examples(path, tok, template, 256, skip_bad=True)
        assert len(examples) == 1 and stats.skipped_bad == 1 and stats.bad_lines == [2]


def test_truncation_is_counted_and_empty_examples_dropped(tmp_path, tok, template):
    rows = [{"instruction": "Count to three.", "output": "one two three " * 20}, {"instruction": "x " * 80, "output": "y"}]
    examples, stats = load_examples(_write(tmp_path / "l.jsonl", rows), tok, template, max_seq_len=24)
    assert stats.truncated == 2 and stats.dropped_empty == 1 and len(examples) == 1
    assert len(examples[0].input_ids) == 24


def test_pad_batch_right_pads_and_masks():
    a = Example(np.array([5, 6, 7]), np.array([-100, 6, 7]))
    b = Example(np.array([8]), np.array([8]))
    batch = pad_batch([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_batch_plan_resumes_exactly():
    plan = BatchPlan(num_examples=10, batch_size=4, seed=3)
    it = iter(plan)
    seen = [next(it) for _ in range(8)]  # 2.67 epochs: 3 batches per epoch, the last one partial
    assert [len(b[2]) for b in seen[:3]] == [4, 4, 2] and sorted(sum((b[2] for b in seen[:3]), [])) == list(range(10))
    assert seen[0][2] != seen[3][2]  # a new order each epoch
    midway = BatchPlan(10, 4, seed=3)
    it2 = iter(midway)
    for _ in range(4):
        next(it2)
    saved = json.loads(json.dumps(midway.position))
    resumed = BatchPlan(10, 4, seed=3)
    resumed.restore(saved)
    it3 = iter(resumed)
    assert [next(it3) for _ in range(4)] == seen[4:8]
