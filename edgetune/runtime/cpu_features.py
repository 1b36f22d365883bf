"""What this CPU offers that changes how a bundle's numbers come out; warnings for ``train``.

``--compute int8`` bundles (export/compute_int8.py) multiply uint8 activations by int8 weights
in ONNX Runtime's ``MatMulIntegerToFloat``. On x86 CPUs with VNNI (AVX-512 VNNI or AVX-VNNI)
its kernel accumulates in 32 bits, exactly. Without VNNI (AVX2-only CPUs, AVX-512 without VNNI)
its kernel adds pairs of products into 16 bits with saturation (``vpmaddubsw``), so some
products are clipped and the step differs more from fp32 than the README's measurements (made
on a VNNI CPU) say. Other platforms are not flagged: only x86's kernels have that form.
"""

from __future__ import annotations

import platform
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The first CPU's feature flags on Linux (x86 ``flags``, ARM ``Features`` line of /proc/cpuinfo);
    None where unknown (another OS, no such line). The bench reads its SIMD report from here too."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.partition(":")[0].strip() in ("flags", "Features"):
                return set(line.partition(":")[2].split())
    except OSError:
        return None
    return None


def int8_compute_warning(producer: dict, machine: str | None = None, flags: set[str] | None = None) -> str | None:
    """A one-line warning when an int8-compute bundle trains on an x86 CPU without VNNI; else None."""
    if (producer.get("compute") or {}).get("matmul") != "int8":
        return None
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return None
    flags = cpu_flags() if flags is None else flags
    if flags is None or any(f in flags for f in VNNI_FLAGS):
        return None
    return ("warning: this bundle multiplies in int8 (--compute int8) and this CPU has no VNNI: ONNX Runtime's "
            "uint8 x int8 kernel here saturates pairs of products in 16 bits, so results differ more from fp32 "
            "than measured on VNNI CPUs; for exact numbers re-export with --compute fp32.")
