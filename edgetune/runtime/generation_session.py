"""The generation session, built once per bundle and ONNX Runtime version and then loaded ready-made.

ONNX Runtime optimises a graph at every session start (about a second of CPU for SmolLM2-135M's
generation graph). The first start therefore writes ORT's optimised model
(``optimized_model_filepath``) into ``<bundle>/generation-cache/``; later starts load it with
optimisation off. The weights go to a file of their own: ONNX Runtime memory-maps external data
instead of copying it out of a parsed protobuf, which halves the session's memory (SmolLM2-135M
int8: 0.23 GB peak RSS after loading instead of 0.43 GB).

  generation-<compute>.onnx                the optimised graph (small)
  generation-<compute>.<16 hex>.weights    its weights; a new name for every build, so a process
                                           still reading (memory-mapping) an old one is never hit
  generation-<compute>.json                {"format", "source_sha256" (the bundle's generation
                                           graph, as its manifest lists it, checked by Bundle.digest),
                                           "onnxruntime" (version), "compute", "sha256" (graph),
                                           "weights", "weights_sha256"}

A cache is used only when the JSON parses, every key matches, the entries are regular files (no
symlinks, in a real folder), both SHA-256 match, the weights name is the pattern above, and every
external-data reference in the graph names exactly that weights file (ONNX Runtime would follow any
other). Anything else — stale, damaged, tampered, half-written — is rebuilt, never trusted. The
JSON is removed before and written after a build, so a crash mid-build leaves no valid entry. A
bundle folder that cannot be written runs uncached; a bundle opened without hash verification too.

``compute``: "exact" (default) runs the bundle's graph as exported. "int8" sets
``accuracy_level=4`` on every MatMulNBits: activations are quantized to int8 per block of the
input and the products are integer; faster, and the logits move (bench/generation.py, README), so
it is an option only.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from edgetune.bundle import Bundle, sha256_file
from edgetune.bundle_paths import may_reference_external_data
from edgetune.errors import BundleError, EdgetuneError
from edgetune.runtime.ort_import import onnxruntime

CACHE_DIR = "generation-cache"
CACHE_FORMAT = 2  # bump when what a cached graph holds changes
COMPUTES = ("exact", "int8")
INT8_ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations (per block) x the 4-bit halves, integer products
CACHE_ABOVE_BYTES = 1_800_000_000  # a source graph this large keeps its own external data: not cached
EXTERNAL_MIN_BYTES = "1024"  # initializers from this size go to the weights file


def check_compute(compute) -> str:
    if compute not in COMPUTES:
        raise EdgetuneError(f"`--compute` must be one of {', '.join(COMPUTES)}, got {compute!r}.")
    return compute


def open_session(bundle: Bundle, options, compute: str = "exact", cache: bool = True):
    """An InferenceSession on the bundle's generation graph: from the cache when it is valid, else built
    (and cached). ``options`` is a fresh SessionOptions (threads etc.) that this function completes."""
    ort = onnxruntime()
    check_compute(compute)
    # The cache's key: the graph's verified hash. Bundle.path also checks the graph's external data
    # on every start, cached or not, so a bundle whose graph points outside is refused even when it
    # ships a cache (a hostile bundle is refused whole, not run from a part it vouches for).
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
    target = _cache_target(folder, source, compute, meta) if cache else None
    if target is None:
        return ort.InferenceSession(model, options, providers=providers)
    tmp, weights = target
    options.optimized_model_filepath = str(tmp)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", weights.name)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", EXTERNAL_MIN_BYTES)
    try:
        session = ort.InferenceSession(model, options, providers=providers)
        if not _commit(tmp, weights, graph, meta, expected):
            weights.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)
    return session


def _weights_pattern(compute: str) -> re.Pattern:
    return re.compile(rf"generation-{re.escape(compute)}\.[0-9a-f]{{16}}\.weights")


def _valid(folder: Path, graph: Path, meta: Path, expected: dict) -> bool:
    if folder.is_symlink() or not folder.is_dir() or any(p.is_symlink() or not p.is_file() for p in (graph, meta)):
        return False
    try:
        recorded = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(recorded, dict) or any(recorded.get(k) != v for k, v in expected.items()):
        return False  # stale: another bundle graph, ONNX Runtime version, compute or cache format
    name = recorded.get("weights")
    if not isinstance(name, str) or not _weights_pattern(expected["compute"]).fullmatch(name):
        return False
    weights = folder / name
    if weights.is_symlink() or not weights.is_file():
        return False
    if recorded.get("sha256") != sha256_file(graph) or recorded.get("weights_sha256") != sha256_file(weights):
        return False
    return _external_locations(graph) == {name}


def _external_locations(graph: Path) -> set[str] | None:
    """The external-data file names the graph refers to (parsed without loading them); None if unreadable."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception:  # protobuf's DecodeError and friends: a damaged graph is simply not used
        return None
    return {entry.value for t in _get_all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL
            for entry in t.external_data if entry.key == "location"}


def _cache_target(folder: Path, source: Path, compute: str, meta: Path) -> tuple[Path, Path] | None:
    """(temp graph path, fresh weights path) in the cache folder, with the old JSON removed; None when
    the graph is not cached (too large, external data, folder not writable or a symlink)."""
    if source.stat().st_size > CACHE_ABOVE_BYTES or may_reference_external_data(source):
        return None
    try:
        if folder.is_symlink():
            return None
        folder.mkdir(exist_ok=True)
        meta.unlink(missing_ok=True)  # no JSON may vouch for files while they are being replaced
        tmp = folder / f".generation-{compute}.{os.getpid()}.{os.urandom(4).hex()}.partial.onnx"
        tmp.touch()
        return tmp, folder / f"generation-{compute}.{os.urandom(8).hex()}.weights"
    except OSError:
        return None


def _commit(tmp: Path, weights: Path, graph: Path, meta: Path, expected: dict) -> bool:
    """Move the freshly written optimised graph into place, drop older weights, then write the JSON."""
    from edgetune.atomic import atomic_write_bytes, fsync_file, replace_file

    try:
        if not tmp.is_file() or tmp.stat().st_size == 0 or not weights.is_file():
            return False  # ORT wrote nothing usable: run uncached
        if _external_locations(tmp) != {weights.name}:
            return False
        for path in (tmp, weights):
            fsync_file(path)
        record = {**expected, "sha256": sha256_file(tmp), "weights": weights.name, "weights_sha256": sha256_file(weights)}
        meta.unlink(missing_ok=True)  # another process may have committed meanwhile: its JSON must not vouch for ours
        replace_file(tmp, graph)
        pattern = _weights_pattern(expected["compute"])
        for old in graph.parent.iterdir():  # a process still mapping one keeps its pages: unlinking is safe
            if old != weights and pattern.fullmatch(old.name) and not old.is_symlink():
                old.unlink(missing_ok=True)
        atomic_write_bytes(meta, (json.dumps(record, indent=1) + "\n").encode())
        return True
    except OSError:
        return False  # a full or read-only disk costs the cache, not the answer


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
