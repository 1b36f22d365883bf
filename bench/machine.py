"""What the numbers were taken on: CPU, cores, memory, load, package versions."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("edgetune", "onnxruntime-training-cpu", "onnxruntime", "onnx", "torch", "transformers", "peft", "numpy")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# /proc/cpuinfo flag -> the name the report prints. x86 "flags", ARM "Features" lines.
SIMD_FLAGS = {
    "avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512F", "avx512bw": "AVX-512BW", "avx512_vnni": "AVX-512 VNNI",
    "avx512_bf16": "AVX-512 BF16", "avx_vnni": "AVX-VNNI", "amx_tile": "AMX", "amx_int8": "AMX-INT8",
    "amx_bf16": "AMX-BF16",
    "asimd": "NEON", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "SVE", "sve2": "SVE2", "bf16": "BF16",
}


def cpu_flags() -> set[str]:
    """The first CPU's feature flags from /proc/cpuinfo (empty off Linux): edgetune's own reader."""
    from edgetune.runtime.cpu_features import cpu_flags as read_flags

    return read_flags() or set()


def simd_features(flags: set[str] | None = None) -> list[str]:
    """The SIMD features that decide GEMM speed (int8 ones: AVX-512 VNNI, AVX-VNNI, AMX-INT8, dotprod, i8mm)."""
    flags = cpu_flags() if flags is None else flags
    return [name for flag, name in SIMD_FLAGS.items() if flag in flags]


def machine(threads: int) -> dict:
    import psutil

    return {
        "cpu": cpu_model(),
        "simd": simd_features(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "memory_bytes": psutil.virtual_memory().total,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],  # > 0 means others were running
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict:
    out = {}
    for package in PACKAGES:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass  # e.g. only one of the onnxruntime builds is installed
    return out
