"""Generation on the int8 weights (MatMulNBits on split nibbles) and the cached optimised session.

Stated tolerances (max abs logit difference over real tokens, tiny Llama of tests/test_generation.py):
the int8 kernels against the previous fp32-copy path (DequantizeLinear folded to fp32 at load),
1e-4 (measured 1.7e-6: the same int8 weights, only the summation order differs); greedy tokens equal.
``compute="int8"`` (int8 activations per block) moves the logits: within 5 % of their largest
magnitude here (measured 2.0 %; argmax equal at 90 % of positions), and not bit-equal to the exact path.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from edgetune.bundle import Bundle
from edgetune.errors import BundleError, EdgetuneError
from edgetune.quantization import join_nibbles, quantize_rows, split_nibbles

torch = pytest.importorskip("torch")


# --- the numbers ------------------------------------------------------------------------------------
def _dequantize_nbits(b: np.ndarray, scales: np.ndarray, zp: np.ndarray, n: int, k2: int, bs: int) -> np.ndarray:
    """MatMulNBits' own reading of (B, scales, zero points): (N, K') fp32, as its spec defines it."""
    flat = b.reshape(n, -1)
    values = np.empty((n, flat.shape[1] * 2), np.float32)
    values[:, 0::2], values[:, 1::2] = flat & 0x0F, flat >> 4
    blocks = k2 // bs
    z = np.empty((n, (blocks + 1) // 2 * 2), np.float32)
    zflat = zp.reshape(n, -1)
    z[:, 0::2], z[:, 1::2] = zflat & 0x0F, zflat >> 4
    s = scales.reshape(n, blocks)
    return (values.reshape(n, blocks, bs) - z[:, :blocks, None]) * s[:, :, None]


@pytest.mark.parametrize("shape,bs", [((8, 64), 64), ((5, 96), 32), ((3, 48), 16)])
def test_split_nibbles_hold_int8_exactly(shape, bs):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32)
    w[0, 0], w[1, 1] = 5.0, -5.0  # the extremes +127 and -127 occur
    q, scale = quantize_rows(w)
    assert q.max() == 127 and q.min() == -127
    b, scales, zp = split_nibbles(q, scale, bs)
    back_q, back_scale = join_nibbles(b, scales)
    np.testing.assert_array_equal(back_q, q)
    np.testing.assert_array_equal(back_scale, scale)
    halves = _dequantize_nbits(b, scales, zp, shape[0], 2 * shape[1], bs).reshape(shape[0], 2, shape[1])
    np.testing.assert_allclose(halves[:, 0] + halves[:, 1], q * scale[:, None], rtol=1e-6, atol=1e-7)


# --- the graph against the previous path -----------------------------------------------------------
@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """(model, adapter, {"nbits": Bundle, "fp32-copy": Bundle}): one int8 export with the kernels and one without."""
    from edgetune.export import generation_graph
    from edgetune.export.training_graph import graph_name
    from tests.test_generation import _bundle, _manifest, _tiny_lora_llama

    model, trainables = _tiny_lora_llama()
    adapter = {graph_name(t.torch_name): model.get_submodule(t.module_path).get_parameter(t.attr).detach().numpy().copy()
               for t in trainables}
    bundles = {}
    rewrite = generation_graph.int8_linears_to_nbits
    for kind in ("nbits", "fp32-copy"):
        folder = tmp_path_factory.mktemp(kind)
        generation_graph.int8_linears_to_nbits = rewrite if kind == "nbits" else (lambda proto: 0)
        try:
            info = generation_graph.export_generation_graph(model, trainables, folder / "generation_model.onnx", quantize=True)
        finally:
            generation_graph.int8_linears_to_nbits = rewrite
        bundles[kind] = _bundle(folder, _manifest(info, adapter))
    return model, adapter, bundles


def _batch(vocab: int = 128):
    ids = np.random.default_rng(0).integers(0, vocab, (2, 12), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    return ids, mask


def test_graph_holds_no_fp32_weight(graphs):
    _, _, bundles = graphs
    new, old = bundles["nbits"], bundles["fp32-copy"]
    assert new.manifest.generation.linear_kernel == "int8-split-nibbles"
    assert old.manifest.generation.linear_kernel is None
    proto = onnx.load(str(new.path("generation")))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == 2 * 7 + 1  # every linear of both blocks, and the head (tied to the embedding)
    assert "DequantizeLinear" not in ops
    matrices = [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2]
    assert matrices == []
    assert any(t.data_type == onnx.TensorProto.INT8 and t.name == "model.embed_tokens.weight.int8" for t in proto.graph.initializer)


def test_int8_kernels_give_the_fp32_copy_paths_logits_and_tokens(graphs):
    from edgetune.runtime.adapter_source import disabled
    from edgetune.runtime.generate import Generator

    _, adapter, bundles = graphs
    new, old = Generator(bundles["nbits"], threads=1), Generator(bundles["fp32-copy"], threads=1)
    ids, mask = _batch()
    real = mask.astype(bool)
    for feed in (adapter, disabled(bundles["nbits"], adapter)):
        a, b = new.logits(ids, mask, feed), old.logits(ids, mask, feed)
        assert np.abs(a[real] - b[real]).max() <= 1e-4
    prompt = np.array([5, 17, 99, 3, 42], np.int64)
    assert new.generate(prompt, adapter, max_new_tokens=16).tolist() == old.generate(prompt, adapter, max_new_tokens=16).tolist()


def test_int8_compute_moves_the_logits_a_little(graphs):
    from edgetune.runtime.generate import Generator

    _, adapter, bundles = graphs
    ids, mask = _batch()
    real = mask.astype(bool)
    exact = Generator(bundles["nbits"], threads=1).logits(ids, mask, adapter)[real]
    int8 = Generator(bundles["nbits"], threads=1, compute="int8").logits(ids, mask, adapter)[real]
    diff = np.abs(int8 - exact).max()
    assert 0 < diff <= 0.05 * np.abs(exact).max()


def test_int8_compute_needs_the_kernels_and_a_known_name(graphs):
    from edgetune.runtime.generate import Generator

    _, _, bundles = graphs
    with pytest.raises(BundleError, match="no int8 kernels"):
        Generator(bundles["fp32-copy"], compute="int8")
    with pytest.raises(EdgetuneError, match="--compute"):
        Generator(bundles["nbits"], compute="fp16")


# --- the session cache ------------------------------------------------------------------------------
@pytest.fixture
def cached(graphs, tmp_path, monkeypatch):
    """A private copy of the int8 generation bundle, and a counter of cache builds."""
    from edgetune.runtime import generation_session

    src = graphs[2]["nbits"]
    folder = tmp_path / "bundle"
    shutil.copytree(src.folder, folder, ignore=shutil.ignore_patterns("generation-cache"))
    bundle = Bundle(folder, src.manifest, verified=True)
    builds = []
    real = generation_session._commit
    monkeypatch.setattr(generation_session, "_commit", lambda *a: builds.append(a[2].name) or real(*a))
    ADAPTER.update(graphs[1])
    return bundle, builds


ADAPTER: dict[str, np.ndarray] = {}  # the tiny model's adapter, set by ``cached``


def _logits(bundle, **kwargs):
    from edgetune.runtime.generate import Generator

    ids, mask = _batch()
    return Generator(bundle, threads=1, **kwargs).logits(ids, mask, ADAPTER)


def test_cache_is_written_once_and_reused(cached):
    from edgetune.runtime.ort_import import onnxruntime

    bundle, builds = cached
    first = _logits(bundle)
    cache = bundle.folder / "generation-cache"
    record = json.loads((cache / "generation-exact.json").read_text())
    assert record["source_sha256"] == bundle.manifest.files["generation_model.onnx"]
    assert record["onnxruntime"] == onnxruntime().__version__ and record["compute"] == "exact"
    assert builds == ["generation-exact.onnx"]
    assert _weights_files(cache) == [record["weights"]]  # the weights live beside the graph, memory-mapped at load
    assert (cache / "generation-exact.onnx").stat().st_size < (cache / record["weights"]).stat().st_size
    stamp = (cache / "generation-exact.onnx").stat().st_mtime_ns
    again = _logits(bundle)
    assert builds == ["generation-exact.onnx"]  # loaded, not rebuilt
    assert (cache / "generation-exact.onnx").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again, first)
    _logits(bundle, compute="int8")  # its own entry beside the exact one
    assert builds == ["generation-exact.onnx", "generation-int8.onnx"]
    assert (cache / "generation-exact.json").is_file() and (cache / "generation-int8.json").is_file()


def _weights_files(cache):
    return sorted(p.name for p in cache.glob("generation-exact.*.weights"))


@pytest.mark.parametrize("damage", ["flip-byte", "flip-weights-byte", "other-graph", "stale-version", "stale-source",
                                    "bad-json", "no-json", "weights-elsewhere", "foreign-location"])
def test_damaged_or_stale_cache_is_rebuilt_not_trusted(cached, damage, tmp_path):
    from onnx.external_data_helper import _get_all_tensors

    from edgetune.bundle import sha256_file

    bundle, builds = cached
    first = _logits(bundle)
    cache = bundle.folder / "generation-cache"
    graph, meta = cache / "generation-exact.onnx", cache / "generation-exact.json"
    record = json.loads(meta.read_text())
    weights = cache / record["weights"]
    if damage in ("flip-byte", "flip-weights-byte"):
        path = graph if damage == "flip-byte" else weights
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "other-graph":  # a valid graph, but not the one recorded
        shutil.copyfile(bundle.path("generation"), graph)
    elif damage == "stale-version":
        meta.write_text(json.dumps({**record, "onnxruntime": "0.0.1"}))
    elif damage == "stale-source":
        meta.write_text(json.dumps({**record, "source_sha256": "0" * 64}))
    elif damage == "bad-json":
        meta.write_text("{not json")
    elif damage == "no-json":
        meta.unlink()
    elif damage == "weights-elsewhere":  # the JSON names a file outside the cache folder
        meta.write_text(json.dumps({**record, "weights": "../../" + record["weights"]}))
    else:  # hashes all consistent, but the graph reads its weights from a file outside the folder
        outside = tmp_path / "outside.weights"
        shutil.copyfile(weights, outside)
        model = onnx.load(str(graph), load_external_data=False)
        for t in _get_all_tensors(model):
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = str(outside)
        onnx.save(model, str(graph))
        meta.write_text(json.dumps({**record, "sha256": sha256_file(graph)}))
    np.testing.assert_allclose(_logits(bundle), first, atol=1e-6)
    assert len(builds) == 2  # rebuilt
    record = json.loads(meta.read_text())
    assert record["sha256"] == sha256_file(graph) and record["onnxruntime"] != "0.0.1"
    assert _weights_files(cache) == [record["weights"]]  # the old weights file is gone
    assert record["weights_sha256"] == sha256_file(cache / record["weights"])


def test_symlinked_cache_folder_is_neither_read_nor_written(cached, tmp_path):
    bundle, builds = cached
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (bundle.folder / "generation-cache").symlink_to(elsewhere)
    _logits(bundle)
    _logits(bundle)
    assert builds == [] and list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("how", ["cache=False", "unverified"])
def test_no_cache_when_off_or_bundle_unverified(cached, how):
    bundle, builds = cached
    if how == "cache=False":
        _logits(bundle, cache=False)
    else:
        _logits(Bundle(bundle.folder, bundle.manifest, verified=False))
    assert builds == [] and not (bundle.folder / "generation-cache").exists()


# --- the stock onnxruntime package (Python 3.12, `make venv312`) -------------------------------------
STOCK_RUN = """
import json, sys, numpy as np
from pathlib import Path
from edgetune.bundle import Bundle, Manifest
from edgetune.runtime.generate import Generator
from edgetune.runtime.ort_import import training_build_installed
folder, out = Path(sys.argv[1]), Path(sys.argv[2])
manifest = Manifest.from_dict(json.loads((folder / "manifest-for-test.json").read_text()))
feeds = np.load(folder / "feeds.npz")
adapter = {k[8:]: feeds[k] for k in feeds.files if k.startswith("adapter:")}
exact = Generator(Bundle(folder, manifest, verified=True), threads=1)
int8 = Generator(Bundle(folder, manifest, verified=True), threads=1, compute="int8")
np.savez(out, exact=exact.logits(feeds["ids"], feeds["mask"], adapter), int8=int8.logits(feeds["ids"], feeds["mask"], adapter),
         tokens=exact.generate(feeds["prompt"], adapter, max_new_tokens=16), training_build=training_build_installed())
"""


def test_stock_onnxruntime_runs_the_int8_kernels_with_the_same_numbers(graphs, tmp_path):
    """MatMulNBits (4-bit, zero points) reads the split nibbles the same way in the stock package."""
    import subprocess

    from edgetune.runtime.generate import Generator
    from tests.portable_runs import REPO, python312

    py312 = python312()
    if py312 is None:
        pytest.skip("no Python 3.12 environment: run `make venv312`")
    _, adapter, bundles = graphs
    src = bundles["nbits"]
    folder = tmp_path / "bundle"
    shutil.copytree(src.folder, folder, ignore=shutil.ignore_patterns("generation-cache"))
    (folder / "manifest-for-test.json").write_text(json.dumps(src.manifest.to_dict()))
    ids, mask = _batch()
    prompt = np.array([5, 17, 99, 3, 42], np.int64)
    np.savez(folder / "feeds.npz", ids=ids, mask=mask, prompt=prompt, **{f"adapter:{k}": v for k, v in adapter.items()})
    run = subprocess.run([str(py312), "-c", STOCK_RUN, str(folder), str(tmp_path / "out.npz")], capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    got = np.load(tmp_path / "out.npz")
    assert not bool(got["training_build"])
    real = mask.astype(bool)
    here = Generator(src, threads=1)
    exact = here.logits(ids, mask, adapter)
    assert np.abs(got["exact"][real] - exact[real]).max() <= 1e-4
    assert got["tokens"].tolist() == here.generate(prompt, adapter, max_new_tokens=16).tolist()
    assert np.abs(got["int8"][real] - exact[real]).max() <= 0.05 * np.abs(exact[real]).max()
