"""ONNX Runtime session options, in one place: threads, memory settings, log level.

The training backend and the generation session both build theirs here, so a device profile
(threads, memory) changes one module.
"""

from __future__ import annotations

from edgetune.errors import EdgetuneError
from edgetune.runtime.ort_import import onnxruntime


def check_threads(threads) -> int:
    """``threads`` as given by ``--threads``: 0 lets ONNX Runtime use every core."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise EdgetuneError(f"`--threads` must be a non-negative integer (0 = all cores), got {threads!r}.")
    return threads


def _base(threads: int):
    options = onnxruntime().SessionOptions()
    if check_threads(threads):
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initializers are noise for users
    return options


def training_options(threads: int = 0):
    """Options for the training and eval graphs."""
    options = _base(threads)
    # No static buffer sharing between values. ORT's planner lets a later value take over a dead
    # value's buffer of the same size, and then frees the buffer only after the last reader of
    # *any* value on it; in a training graph those chains tie forward buffers to backward values
    # (recomputed activations, gradients), so every forward activation stayed allocated until the
    # backward pass and the exporter's activation recompute saved nothing: 1.27 GB peak RSS
    # instead of 0.55 GB for SmolLM2-135M at 4 x 128 tokens with --recompute full (README,
    # "Where the memory went"). Freed memory still returns to ORT's arena and is reused from
    # there, so steps are not slower.
    options.enable_mem_reuse = False
    return options


def generation_options(threads: int = 0):
    """Options for the KV-cache generation graph."""
    options = _base(threads)
    # Bundles exported before the int8 kernels (generation.linear_kernel None) read their weights
    # through DequantizeLinear: let ORT fold those into fp32 constants at load (by default it keeps
    # them for QDQ fusions, and re-dequantizes every weight on every step). SmolLM2-135M int8,
    # 2 threads: 24 ms instead of 246 ms per token, peak RSS 1.89 GB instead of 1.66 GB. Graphs
    # with the int8 kernels (MatMulNBits) have no such DequantizeLinear: the entry changes nothing.
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return options
