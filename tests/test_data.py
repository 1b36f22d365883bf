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


# --- input that is not UTF-8 JSON lines, unknown roles, oversized records ------------------------
GOOD = json.dumps({"instruction": "Say hello.", "output": "hello there"}).encode() + b"\n"


@pytest.mark.parametrize("bad_line, message", [
    (b'{"instruction": "caf\xe9", "output": "x"}\n', "bad.jsonl line 2: not UTF-8 text (byte 0xe9 at byte 21)"),
    (b"\x89PNG\r\n", "bad.jsonl line 2: not UTF-8 text (byte 0x89 at byte 1)"),
    (b"\x00\x01\x02\xff binary\n", "bad.jsonl line 2: a NUL byte at byte 1: binary data or UTF-16 text"),
])
def test_non_utf8_lines_are_refused_with_line_or_skipped(tmp_path, tok, template, bad_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(GOOD + bad_line + GOOD)
    with pytest.raises(DataError) as err:
        load_examples(path, tok, template, 256)
    assert message in str(err.value) and "--skip-bad" in str(err.value)
    examples, stats = load_examples(path, tok, template, 256, skip_bad=True)
    assert len(examples) == 2 and stats.skipped_bad == 1 and stats.bad_lines == [2]


@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16"), ("utf-16-be", None), ("utf-32", "UTF-32")])
def test_utf16_and_utf32_files_are_refused(tmp_path, tok, template, encoding, name):
    path = tmp_path / "wide.jsonl"
    path.write_bytes((GOOD.decode() * 2).encode(encoding))
    for skip_bad in (False, True):
        with pytest.raises(DataError) as err:
            load_examples(path, tok, template, 256, skip_bad=skip_bad)
        if name:  # with a byte-order mark the whole file is refused by its encoding
            assert f"wide.jsonl line 1: the file is {name} text" in str(err.value)
        elif skip_bad:  # no mark: every line holds NUL bytes and is skipped
            assert "2 bad lines skipped" in str(err.value)
        else:
            assert "wide.jsonl line 1: a NUL byte" in str(err.value)


def test_utf8_byte_order_mark_is_accepted(tmp_path, tok, template):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD)
    examples, _ = load_examples(path, tok, template, 256)
    assert len(examples) == 1


def test_unknown_chat_role_is_refused_naming_the_allowed_roles(tmp_path, tok, template):
    chat = {"messages": [{"role": "wizard", "content": "Hi."}, {"role": "assistant", "content": "hello"}]}
    path = _write(tmp_path / "roles.jsonl", [chat])
    with pytest.raises(DataError) as err:
        load_examples(path, tok, template, 256)
    assert "roles.jsonl line 1: messages[0] has role 'wizard'" in str(err.value)
    assert "system, user, assistant" in str(err.value) and "tool" not in str(err.value)
    ok = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi."},
                       {"role": "assistant", "content": "hello"}]}
    (ex,), _ = load_examples(_write(tmp_path / "ok.jsonl", [ok]), tok, template, 256)
    assert _labelled_text(tok, ex) == "hello<|im_end|>\n"


def test_tool_role_is_allowed_when_the_template_names_it(tmp_path, tok):
    tool_template = ChatTemplate(CHATML_TEMPLATE.replace("{% for message in messages %}",
                                                         "{% for message in messages %}{% if message['role'] == 'tool' %}"
                                                         "{% endif %}"), None, "<|im_end|>")
    assert tool_template.roles == ("system", "user", "assistant", "tool")
    chat = {"messages": [{"role": "user", "content": "Weather?"}, {"role": "tool", "content": "sunny"},
                         {"role": "assistant", "content": "sunny"}]}
    (ex,), _ = load_examples(_write(tmp_path / "tool.jsonl", [chat]), tok, tool_template, 256)
    assert _labelled_text(tok, ex) == "sunny<|im_end|>\n"


def test_oversized_record_is_refused_before_reading_it_whole(tmp_path, tok, template, monkeypatch):
    from edgetune.runtime import data, jsonl

    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:  # 50 MiB of one record between two good lines
        f.write(GOOD + b'{"text": "' + b"a" * (50 << 20) + b'"}\n' + GOOD)
    reads = []
    real_open = open

    class Counting:  # records how many bytes each read asked for
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def readline(self, size=-1):
            reads.append(size)
            return self.f.readline(size)

    monkeypatch.setattr(jsonl, "open", lambda p, mode="r": Counting(real_open(p, mode)), raising=False)
    real_encode = data._encode
    monkeypatch.setattr(data, "_encode", lambda t, text: real_encode(t, text) if len(text) < 1000 else pytest.fail("tokenized"))
    with pytest.raises(DataError) as err:
        load_examples(path, tok, template, 256)
    assert "big.jsonl line 2: the record is longer than the 1 MiB a line may hold" in str(err.value)
    assert all(0 < r <= (1 << 20) + 1 for r in reads) and len(reads) == 2  # bounded reads; stopped at once
    monkeypatch.undo()
    examples, stats = load_examples(path, tok, template, 256, skip_bad=True)
    assert len(examples) == 2 and stats.bad_lines == [2]


def test_record_cap_is_a_parameter(tmp_path, tok, template):
    path = _write(tmp_path / "cap.jsonl", [{"text": "x" * 100}])
    with pytest.raises(DataError, match=r"cap.jsonl line 1: the record is longer than the 64 bytes"):
        load_examples(path, tok, template, 256, max_record_bytes=64)
    assert len(load_examples(path, tok, template, 256, max_record_bytes=len(path.read_bytes()) - 1)[0]) == 1


def test_too_deep_or_too_long_numbers_are_data_errors(tmp_path, tok, template):
    path = tmp_path / "deep.jsonl"
    path.write_bytes(GOOD + b"[" * 200_000 + b"]" * 200_000 + b"\n" + b'{"text": ' + b"9" * 5000 + b"}\n")
    examples, stats = load_examples(path, tok, template, 256, skip_bad=True)
    assert len(examples) == 1 and stats.bad_lines == [2, 3]
    with pytest.raises(DataError, match="deep.jsonl line 2: JSON nested too deeply"):
        load_examples(path, tok, template, 256)


@pytest.mark.parametrize("content, expected", [
    (bytes(range(256)) * 64, "bin.jsonl line 1: a NUL byte at byte 1"),
    ((GOOD.decode() * 3).encode("utf-16"), "bin.jsonl line 1: the file is UTF-16 text"),
    (b'{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
     "bin.jsonl line 1: messages[0] has role 'wizard'; the chat template knows the roles system, user, assistant"),
])
def test_cli_refuses_undecodable_data_in_one_line(tiny_bundle, tmp_path, content, expected):
    import shutil
    import subprocess
    import sys

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    data = tmp_path / "bin.jsonl"
    data.write_bytes(content)
    r = subprocess.run([sys.executable, "-m", "edgetune.cli", "train", str(bundle), "--data", str(data), "--steps", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr
