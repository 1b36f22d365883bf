"""Packed batches (runtime/packing.py): the same loss and gradients as the examples one by one.

The graph's loss is the mean over every label position of the batch, so a packed batch must give
sum(example loss x its label positions) / all label positions of the examples run alone, and the
LoRA gradients weighted the same way. Checked through the ORT training backend (fp32 and int8
bases, the default memory plan) and, for fp32, against PyTorch + PEFT.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgetune.bundle import Bundle, read_manifest
from edgetune.constants import IGNORE_INDEX
from edgetune.runtime.data import Example
from edgetune.runtime.packing import (GROUPED, PACKED, SHUFFLED, LengthGroupedPlan, PackedPlan, choose_layout,
                                      collate, pack_rows, supports_packing)
from tests.test_memory import _loss_and_grads, _start

LENGTHS = (9, 5, 13, 7, 4, 11)  # packed into rows of 24 tokens: three rows, one with padding


def _examples(vocab: int, seed: int = 0) -> list[Example]:
    """Random token ids; the first ~third of each example is prompt (label IGNORE_INDEX)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in LENGTHS:
        ids = rng.integers(3, vocab, size=n, dtype=np.int64)
        labels = ids.copy()
        labels[: max(1, n // 3)] = IGNORE_INDEX
        out.append(Example(ids, labels))
    return out


def _label_positions(example: Example) -> int:
    return int((example.labels[1:] != IGNORE_INDEX).sum())


def _weighted(values, weights):
    return sum(v * w for v, w in zip(values, weights)) / sum(weights)


def _packed_batch(examples, pad_id: int):
    rows = pack_rows([len(e.input_ids) for e in examples], range(len(examples)), capacity=24)
    assert len(rows) < len(examples) and max(len(r) for r in rows) >= 2  # really packed
    batch = collate(examples, rows, pad_id)
    assert (batch["attention_mask"] == 0).any()  # and one row is padded
    return batch


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_packed_batch_equals_examples_one_by_one(export_tiny, quantize):
    bundle = export_tiny(quantize=quantize)
    manifest = read_manifest(bundle)
    assert supports_packing(manifest)
    examples = _examples(manifest.base_model["config"]["vocab_size"])
    start = _start(bundle)
    loss, grads = _loss_and_grads(bundle, _packed_batch(examples, manifest.tokenizer.pad_token_id), start)

    alone = [_loss_and_grads(bundle, collate(examples, [[i]], 0), start) for i in range(len(examples))]
    weights = [_label_positions(e) for e in examples]
    ref_loss = _weighted([a[0] for a in alone], weights)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    for name in grads:
        ref = _weighted([a[1][name] for a in alone], weights)
        assert np.abs(ref).max() > 0, name
        np.testing.assert_allclose(grads[name], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=name)


def test_packed_batch_matches_peft_on_each_example(export_tiny, tiny_model_dir):
    """PyTorch + PEFT, each example alone, losses weighted by label positions: same loss and LoRA gradients."""
    import torch

    from tests.reference import peft_model

    bundle = export_tiny(quantize="none")
    manifest = read_manifest(bundle)
    examples = _examples(manifest.base_model["config"]["vocab_size"], seed=1)
    start = _start(bundle)
    loss, grads = _loss_and_grads(bundle, _packed_batch(examples, manifest.tokenizer.pad_token_id), start)

    model = peft_model(tiny_model_dir, manifest, {t.peft_key: start[t.graph_name] for t in manifest.trainable})
    model.train()
    total = sum(_label_positions(e) for e in examples)
    ref_loss = 0.0
    for e in examples:
        out = model(input_ids=torch.tensor(e.input_ids[None]), labels=torch.tensor(e.labels[None]))
        part = out.loss * _label_positions(e) / total
        part.backward()
        ref_loss += float(part.detach())
    assert abs(loss - ref_loss) <= 1e-4 * abs(ref_loss)
    by_key = {name.replace(".default", ""): p.grad.numpy() for name, p in model.named_parameters() if p.requires_grad}
    for t in manifest.trainable:
        ref = by_key[t.peft_key]
        np.testing.assert_allclose(grads[t.graph_name], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=t.peft_key)


def test_collate_segments_positions_and_boundary_labels():
    a = Example(np.array([5, 6, 7]), np.array([-100, 6, 7]))
    b = Example(np.array([8, 9]), np.array([8, 9]))
    c = Example(np.array([4]), np.array([4]))
    batch = collate([a, b, c], [[0, 1], [2]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 2, 2], [1, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 0, 0, 0]]
    # 7 must not predict 8: b's first label is dropped; b's own labels stay
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [4, -100, -100, -100, -100]]


def test_pack_rows_fills_rows_and_keeps_every_example_once():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(10, 120, 300)]
    rows = pack_rows(lengths, rng.permutation(300), capacity=256)
    assert sorted(i for row in rows for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 256 for row in rows)
    assert sum(lengths) / (256 * len(rows)) > 0.9  # best fit leaves little room
    with pytest.raises(ValueError):
        pack_rows([300], [0], capacity=256)


@pytest.mark.parametrize("make", [lambda n: PackedPlan(n, 3, seed=5, capacity=64), lambda n: LengthGroupedPlan(n, 3, seed=5)],
                         ids=["packed", "grouped"])
def test_plans_resume_exactly(make):
    lengths = [int(x) for x in np.random.default_rng(1).integers(5, 40, 41)]
    plan = make(lengths)
    it = iter(plan)
    per_epoch = plan.batches_per_epoch
    seen = [next(it) for _ in range(per_epoch * 2 + 2)]
    first = [x for b in seen[:per_epoch] for x in (sum(b[2], []) if isinstance(b[2][0], list) else b[2])]
    assert sorted(first) == list(range(len(lengths)))  # an epoch covers every example once
    midway = make(lengths)
    it2 = iter(midway)
    for _ in range(per_epoch + 1):
        next(it2)
    saved = json.loads(json.dumps(midway.position))
    resumed = make(lengths)
    resumed.restore(saved)
    it3 = iter(resumed)
    assert [next(it3) for _ in range(per_epoch + 1)] == seen[per_epoch + 1:]


def test_length_grouping_cuts_padding():
    lengths = np.random.default_rng(2).integers(5, 200, 400)
    grouped = LengthGroupedPlan(list(lengths), 4, seed=0).order(0)
    shuffled = np.random.default_rng([0, 0]).permutation(400)

    def padding(order):
        return sum(4 * lengths[order[k:k + 4]].max() - lengths[order[k:k + 4]].sum() for k in range(0, 400, 4))

    assert sorted(grouped) == list(range(400))
    assert padding(grouped) < 0.25 * padding(shuffled)


def test_layout_follows_data_shape_flags_and_bundle(export_tiny):
    new, old = read_manifest(export_tiny(quantize="none")), read_manifest(export_tiny(quantize="none", packing=False))
    assert not supports_packing(old) and [i.name for i in old.inputs] == ["input_ids", "attention_mask", "labels"]
    notes = []
    assert choose_layout(None, False, "instruction", new, notes.append) == PACKED
    assert choose_layout(None, False, "chat", new, notes.append) == PACKED
    assert choose_layout(None, False, "text", new, notes.append) == SHUFFLED
    assert choose_layout(True, False, "text", new, notes.append) == PACKED
    assert choose_layout(False, False, "chat", new, notes.append) == SHUFFLED
    assert choose_layout(None, True, "chat", new, notes.append) == GROUPED
    assert notes == []
    assert choose_layout(None, False, "instruction", old, notes.append) == SHUFFLED
    assert "position_ids" in notes[0]


def test_train_packs_by_default_and_old_bundles_train_unpacked(export_tiny, tmp_path):
    """``train`` reports its layout and efficiency; a bundle exported without packing inputs still trains."""
    from tests.test_runtime import _cli, _write_pairs

    data = _write_pairs(tmp_path / "pairs.jsonl")
    for name, opts, layout in [("new", {}, PACKED), ("old", {"packing": False}, SHUFFLED)]:
        bundle = tmp_path / name
        shutil.copytree(export_tiny(quantize="none", **opts), bundle)
        r = _cli("train", bundle, "--data", data, "--steps", 2, "--batch-size", 2, "--quiet")
        assert r.returncode == 0, r.stderr
        line = next(x for x in r.stdout.splitlines() if x.startswith("batches:"))
        assert line.startswith(f"batches: {layout}; efficiency"), line
        efficiency = float(line.split("efficiency ")[1].split(" %")[0])
        assert 0 < efficiency <= 100
    r = _cli("train", tmp_path / "new", "--data", data, "--steps", 2, "--packing", "--group-by-length", "--restart")
    assert r.returncode == 2 and "--group-by-length" in r.stderr and len(r.stderr.strip().splitlines()) == 1
