"""The generation session, built once per bundle and ONNX Runtime version and then loaded ready-made.

ONNX Runtime optimises a graph at every session start (about a second of CPU for SmolLM2-135M's
generation graph). The first start therefore writes ORT's optimised model
(``optimized_model_filepath``) into ``<bundle>/generation-cache/``; later starts load it with
optimisation off. The cache is keyed by what decides its content, and each key is checked:

  generation-<compute>.onnx   the optimised graph
  generation-<compute>.json   {"format", "source_sha256" (the bundle's generation graph, as its
                              manifest lists it and Bundle.open verified), "onnxruntime" (version),
                              "compute", "sha256" (of the .onnx above)}

A cache is used only when the JSON parses, every key matches, both entries are regular files
(no symlinks, in a real folder) and the graph's SHA-256 matches (and the bundle was opened with its
hashes verified, so the source key is the file's); it must also hold no reference to
external data (ONNX Runtime would read such a file). Anything else — stale, damaged, tampered,
half-written — is rebuilt, never trusted. The JSON is written last, so a crash mid-write leaves a
cache that fails its check. A bundle folder that cannot be written runs uncached.

``compute``: "exact" (default) runs the bundle's graph as exported. "int8" sets
``accuracy_level=4`` on every MatMulNBits: activations are quantized to int8 per block of the
input and the products are integer; faster, and the logits move (bench/generation.py measures by
how much), so it is an option only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgetune.bundle import Bundle, sha256_file
from edgetune.bundle_paths import may_reference_external_data
from edgetune.errors import BundleError, EdgetuneError
from edgetune.runtime.ort_import import onnxruntime

CACHE_DIR = "generation-cache"
CACHE_FORMAT = 1  # bump when what a cached graph holds changes
COMPUTES = ("exact", "int8")
INT8_ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations (per block) x the 4-bit halves, integer products
CACHE_ABOVE_BYTES = 1_800_000_000  # a larger graph keeps external data, which the cache does not hold


def check_compute(compute) -> str:
    if compute not in COMPUTES:
        raise EdgetuneError(f"`--compute` must be one of {', '.join(COMPUTES)}, got {compute!r}.")
    return compute


def open_session(bundle: Bundle, options, compute: str = "exact", cache: bool = True):
    """An InferenceSession on the bundle's generation graph: from the cache when it is valid, else built
    (and cached). ``options`` is a fresh SessionOptions (threads etc.) that this function completes."""
    ort = onnxruntime()
    check_compute(compute)
    source = bundle.path("generation")
    expected = {"format": CACHE_FORMAT, "source_sha256": bundle.manifest.files[source.name],
                "onnxruntime": ort.__version__, "compute": compute}
    folder = bundle.folder / CACHE_DIR
    graph, meta = folder / f"generation-{compute}.onnx", folder / f"generation-{compute}.json"
    providers = ["CPUExecutionProvider"]
    cache = cache and bundle.verified  # the key is the manifest's hash of the graph: only once it was checked
    if cache and _valid(folder, graph, meta, expected):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimised when cached
        return ort.InferenceSession(str(graph), options, providers=providers)
    model = _int8_compute_bytes(source) if compute == "int8" else str(source)
    # EXTENDED, not ALL: ALL adds layout rewrites for this very CPU, which ORT advises against saving.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    tmp = _cache_target(folder, source) if cache else None
    if tmp is None:
        return ort.InferenceSession(model, options, providers=providers)
    options.optimized_model_filepath = str(tmp)
    try:
        session = ort.InferenceSession(model, options, providers=providers)
        _commit(tmp, graph, meta, expected)
    finally:
        tmp.unlink(missing_ok=True)
    return session


def _valid(folder: Path, graph: Path, meta: Path, expected: dict) -> bool:
    if folder.is_symlink() or not folder.is_dir():
        return False
    if any(p.is_symlink() or not p.is_file() for p in (graph, meta)):
        return False
    try:
        recorded = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or any(recorded.get(k) != v for k, v in expected.items()):
        return False  # stale: another bundle graph, ONNX Runtime version, compute or cache format
    return recorded.get("sha256") == sha256_file(graph) and not may_reference_external_data(graph)


def _cache_target(folder: Path, source: Path) -> Path | None:
    """A fresh temp path in the cache folder, or None when the graph is not cached (too large, external
    data, folder not writable or a symlink)."""
    if source.stat().st_size > CACHE_ABOVE_BYTES or may_reference_external_data(source):
        return None
    try:
        if folder.is_symlink():
            return None
        folder.mkdir(exist_ok=True)
        probe = folder / f".generation.{os.getpid()}.{os.urandom(4).hex()}.partial.onnx"
        probe.touch()
        return probe
    except OSError:
        return None


def _commit(tmp: Path, graph: Path, meta: Path, expected: dict) -> None:
    """Move the freshly written optimised graph into place, then write its JSON (the commit)."""
    from edgetune.atomic import atomic_write_bytes, fsync_file, replace_file

    try:
        if not tmp.is_file() or tmp.stat().st_size == 0 or may_reference_external_data(tmp):
            return  # ORT wrote nothing usable (or an external-data graph): run uncached
        meta.unlink(missing_ok=True)  # the old JSON must not vouch for the new graph mid-swap
        fsync_file(tmp)
        digest = sha256_file(tmp)
        replace_file(tmp, graph)
        atomic_write_bytes(meta, (json.dumps({**expected, "sha256": digest}, indent=1) + "\n").encode())
    except OSError:
        return  # a full or read-only disk costs the cache, not the answer


def _int8_compute_bytes(source: Path) -> bytes:
    """The generation graph with int8 products in every MatMulNBits, serialised."""
    import onnx

    from edgetune.onnx_graph import set_attr

    model = onnx.load(str(source))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    if not nodes:
        raise BundleError(f"{source}: the generation graph has no int8 kernels (exported before them, or with "
                          "--quantize none); use --compute exact, or re-export the bundle with --quantize int8.")
    for node in nodes:
        set_attr(node, "accuracy_level", INT8_ACCURACY_LEVEL)
    return model.SerializeToString()
