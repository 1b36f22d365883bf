"""--quantize int4: block-wise 4-bit frozen linear weights (embedding int8) that train in the ORT training build."""

from __future__ import annotations

import numpy as np
import pytest

from edgetune.bundle import Bundle, read_manifest
from tests.reference import peft_adamw_step, peft_model
from tests.test_export import RTOL, _batch, _ort_step, _rel


@pytest.fixture(scope="module", params=[32, 128])
def int4_bundle(request, export_tiny):
    return export_tiny(quantize="int4", block_size=request.param)


def _quantized_like_the_bundle(model, block_size: int) -> None:
    """In place: every frozen 2-D weight of a PEFT model replaced by what the bundle computes from its storage."""
    import torch

    from edgetune.quantization import dequantize_blocks, dequantize_rows, quantize_blocks, quantize_rows

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 2 or "lora_" in name:
                continue
            w = p.numpy()
            if "embed_tokens" in name:  # the table (and the head tied to it) stays int8 per row
                p.copy_(torch.tensor(dequantize_rows(*quantize_rows(w))))
            else:  # linear weight (out, in): int4 blocks of W^T along `in`
                p.copy_(torch.tensor(dequantize_blocks(*quantize_blocks(w.T.copy(), block_size), block_size).T.copy()))


def test_manifest_and_checkpoint(int4_bundle, tiny_bundle_int8):
    m = read_manifest(int4_bundle)
    block = [t.quantization for t in m.frozen if "q_proj" in t.graph_name][0]
    assert m.quantization == "int4" and m.producer["opset"] == 21 and block.startswith("int4-block")
    schemes = {t.graph_name: t.quantization for t in m.frozen}
    assert schemes["model.model.embed_tokens.weight"] == "int8-per-channel-symmetric"
    assert all(s.startswith("int4-block") for n, s in schemes.items() if n.endswith("proj.base.weight") or "mlp" in n and n.endswith("weight"))
    # the INT4 weights live in the graphs, not in the checkpoint
    assert (int4_bundle / "checkpoint").stat().st_size < 0.6 * (tiny_bundle_int8 / "checkpoint").stat().st_size


def test_eval_loss_close_to_fp32_and_trains(int4_bundle, tiny_bundle):
    """Stated tolerance: the int4 base's eval loss within 3 % of the fp32 base's on the tiny model."""
    from edgetune.runtime.backend import open_backend

    batch = _batch(read_manifest(tiny_bundle))
    fp32 = open_backend("ort-training", Bundle.open(tiny_bundle), with_eval=True, training=False).eval_loss(batch)
    engine = open_backend("ort-training", Bundle.open(int4_bundle), with_eval=True, training=True)
    before = engine.eval_loss(batch)
    assert abs(before - fp32) <= 0.03 * fp32
    for _ in range(4):
        engine.train_step(batch)
        engine.optimizer_step(1e-2)
    assert engine.eval_loss(batch) < before - 0.05


def test_one_adamw_step_matches_peft_on_the_dequantized_base(int4_bundle, tiny_model_dir):
    """The int4 training step is exactly a PEFT step on the weights the int4 storage stands for (memory plan on)."""
    from edgetune.runtime.adapter_source import initial_adapter

    manifest = read_manifest(int4_bundle)
    block_size = int(next(t.quantization for t in manifest.frozen if t.quantization.startswith("int4")).split("-")[1][5:])
    rng = np.random.default_rng(1)
    start = {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in initial_adapter(Bundle.open(int4_bundle)).items()}
    batch, lr = _batch(manifest), 1e-3
    loss, before, after = _ort_step(int4_bundle, manifest, batch, lr, start)
    model = peft_model(tiny_model_dir, manifest, {t.peft_key: before[t.graph_name] for t in manifest.trainable})
    _quantized_like_the_bundle(model, block_size)
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.register_hook(lambda g, name=name: grads.__setitem__(name, g.detach().numpy().copy()))
    ref_loss, ref_after = peft_adamw_step(model, batch, lr, manifest.optimizer)
    assert abs(loss - ref_loss) <= RTOL * abs(ref_loss)
    # AdamW's first step moves each element by lr * g / (|g| + eps): where the gradient is near eps
    # (1e-8) float rounding decides the step, so those elements may differ by up to lr. Everywhere
    # else the updated tensors must agree to RTOL.
    noise = 100 * manifest.optimizer["eps"]
    for t in manifest.trainable:
        a, r = after[t.graph_name], ref_after[t.peft_key]
        decided = np.abs(grads[t.peft_key.replace(".weight", ".default.weight")]) > noise
        assert decided.mean() > 0.95, t.peft_key
        assert _rel(np.where(decided, a, r), r) <= RTOL, t.peft_key
        assert np.abs(a - r).max() <= lr, t.peft_key


def test_generation_runs(int4_bundle):
    from edgetune.runtime.adapter_source import initial_adapter
    from edgetune.runtime.generate import Generator

    ids = np.array([[5, 9, 12, 40]], np.int64)
    logits = Generator(Bundle.open(int4_bundle)).logits(ids, np.ones_like(ids), initial_adapter(Bundle.open(int4_bundle)))
    assert logits.shape[:2] == (1, 4) and np.isfinite(logits).all()


def test_int4_packing_matches_onnx():
    """Our numpy packing (two values per byte, first in the low nibble) reads back as ONNX's own packing."""
    from onnx import TensorProto, helper, numpy_helper

    from edgetune.export.quantize_int4 import int4_tensor

    rng = np.random.default_rng(0)
    for shape in [(5, 3), (64, 7), (4, 4)]:  # odd and even element counts
        values = rng.integers(-8, 8, size=shape).astype(np.int8)
        ours = numpy_helper.to_array(int4_tensor("a", values))
        theirs = numpy_helper.to_array(helper.make_tensor("b", TensorProto.INT4, list(shape), values.flatten().tolist()))
        np.testing.assert_array_equal(ours, values)
        np.testing.assert_array_equal(ours, theirs)


def test_generation_computes_with_the_training_graphs_int4_blocks(int4_bundle, tiny_model_dir):
    """The generation graph reads the same int4 rounding of the base as training (MatMulNBits on the
    blocks of W^T): its logits equal a PEFT model on the dequantized int4 base to 1e-4."""
    import onnx
    import torch

    from edgetune.runtime.adapter_source import initial_adapter
    from edgetune.runtime.generate import Generator
    from tests.reference import peft_model

    opened = Bundle.open(int4_bundle)
    manifest = opened.manifest
    block_size = int(next(t.quantization for t in manifest.frozen if t.quantization.startswith("int4")).split("-")[1][5:])
    assert manifest.generation.linear_kernel == "int4-blocks"
    nodes = onnx.load(str(opened.path("generation"))).graph.node
    four = [n for n in nodes if n.op_type == "MatMulNBits" and n.input[1].endswith(".nbits4")]
    assert len(four) == 2 * 7 and "DequantizeLinear" not in {n.op_type for n in nodes}  # every linear of both blocks
    assert all(next(a.i for a in n.attribute if a.name == "block_size") == block_size for n in four)
    rng = np.random.default_rng(2)
    adapter = {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in initial_adapter(opened).items()}
    ids = np.array([[5, 9, 12, 40, 7, 3]], np.int64)
    got = Generator(opened, threads=1).logits(ids, np.ones_like(ids), adapter)
    model = peft_model(tiny_model_dir, manifest, {t.peft_key: adapter[t.graph_name] for t in manifest.trainable})
    _quantized_like_the_bundle(model, block_size)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(got - ref).max() <= 1e-4


@pytest.mark.parametrize("off", [True, False])
def test_merge_into_the_int4_generation_graph(int4_bundle, tmp_path, off):
    """merge folds LoRA into the int4 blocks (dequantize, add, re-quantize block-wise, as mlx-lm's merge does).
    With the adapter off the blocks come back unchanged: the logits equal the unmerged graph's to 1e-5.
    With an adapter, each adapted weight is rounded to int4 once more: measured 24 % (blocks of 32) and 18 %
    (blocks of 128) of the largest logit on this tiny random model with a large random adapter; bound 30 %."""
    import onnx
    import onnxruntime as ort

    from edgetune.merge import merge_adapter
    from edgetune.runtime.adapter_source import initial_adapter
    from edgetune.runtime.generate import Generator

    opened = Bundle.open(int4_bundle)
    manifest = opened.manifest
    rng = np.random.default_rng(3)
    adapter = {k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in initial_adapter(opened).items()}
    if off:
        from edgetune.runtime.adapter_source import disabled

        adapter = disabled(opened, adapter)
    out = tmp_path / "merged.onnx"
    merge_adapter(int4_bundle, manifest, adapter, out)
    assert sum(n.op_type == "MatMulNBits" for n in onnx.load(str(out)).graph.node) == 2 * 7 + 1
    ids = np.array([[5, 9, 12, 40, 7, 3]], np.int64)
    info = manifest.generation
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(6)[None],
             **{n: np.zeros((1, info.num_kv_heads, 0, info.head_dim), np.float32) for n in info.past_inputs}}
    merged = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    ref = Generator(opened, threads=1).logits(ids, np.ones_like(ids), adapter)
    assert np.abs(merged - ref).max() <= (1e-5 if off else 0.30 * np.abs(ref).max())

GRAPHS = ("training_model.onnx", "eval_model.onnx", "portable_model.onnx", "portable_eval_model.onnx")


def test_int4_weights_are_stored_once_for_every_graph(int4_bundle):
    """The training, eval and portable graphs read one copy of each INT4 weight, in int4_weights.bin."""
    import onnx
    from onnx import TensorProto

    from edgetune.export.portable.writer import EXTERNAL_MIN_BYTES
    from edgetune.export.quantize_int4 import INT4_WEIGHTS

    manifest = read_manifest(int4_bundle)
    assert INT4_WEIGHTS in manifest.files and manifest.portable["supported"]
    places = {}  # tensor name -> {(offset, length) of each graph's reference}
    for graph in GRAPHS:
        model = onnx.load(str(int4_bundle / graph), load_external_data=False)
        int4 = [t for t in model.graph.initializer if t.data_type == TensorProto.INT4]
        assert int4, graph
        for t in int4:
            if t.data_location != TensorProto.EXTERNAL:  # only the smallest stay inline
                assert len(t.raw_data) < EXTERNAL_MIN_BYTES, (graph, t.name)
                continue
            entries = {e.key: e.value for e in t.external_data}
            assert entries["location"] == INT4_WEIGHTS, (graph, t.name)
            places.setdefault(t.name, set()).add((int(entries["offset"]), int(entries["length"])))
    assert places and all(len(p) == 1 for p in places.values())  # every graph points at the same bytes
    stored = sum(length for (((_, length),)) in places.values())
    assert stored <= (int4_bundle / INT4_WEIGHTS).stat().st_size <= stored + 4096 * len(places)  # + alignment


def test_int4_weights_file_is_verified_and_contained(int4_bundle, tmp_path):
    """A changed int4_weights.bin fails the hash check; a graph pointing its INT4 weights outside
    the bundle is refused even when the manifest's hashes are made to match."""
    import json
    import shutil

    import onnx

    from edgetune.bundle import MANIFEST, sha256_file
    from edgetune.errors import BundleError
    from edgetune.export.quantize_int4 import INT4_WEIGHTS

    changed = tmp_path / "changed"
    shutil.copytree(int4_bundle, changed)
    data = bytearray((changed / INT4_WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (changed / INT4_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="damaged"):
        Bundle.open(changed)

    moved = tmp_path / "moved"
    shutil.copytree(int4_bundle, moved)
    shutil.copy(moved / INT4_WEIGHTS, tmp_path / INT4_WEIGHTS)
    graph = moved / "training_model.onnx"
    model = onnx.load(str(graph), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = f"../{INT4_WEIGHTS}"
    onnx.save(model, str(graph))
    manifest = json.loads((moved / MANIFEST).read_text())
    manifest["files"]["training_model.onnx"] = sha256_file(graph)
    (moved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="training_model.onnx: external data"):
        Bundle.open(moved)


def test_portable_graph_reads_the_shared_int4_weights(int4_bundle):
    """The stock-onnxruntime graph, its INT4 weights in the shared file, gives the training backend's
    loss and gradients."""
    from tests.test_portable_graph import assert_portable_matches_training

    assert_portable_matches_training(int4_bundle, _batch(read_manifest(int4_bundle)))
