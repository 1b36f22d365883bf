"""The int8-compute warning for x86 CPUs without VNNI (edgetune/runtime/cpu_features.py)."""

from __future__ import annotations

from edgetune.runtime.cpu_features import cpu_flags, int8_compute_warning

INT8 = {"compute": {"matmul": "int8"}}


def test_warns_for_int8_compute_on_x86_without_vnni():
    text = int8_compute_warning(INT8, machine="x86_64", flags={"avx2", "fma", "avx512f"})
    assert text and "no VNNI" in text and "--compute fp32" in text


def test_silent_where_the_kernel_is_exact_or_the_bundle_is_fp32():
    assert int8_compute_warning(INT8, machine="x86_64", flags={"avx2", "avx512_vnni"}) is None
    assert int8_compute_warning(INT8, machine="x86_64", flags={"avx2", "avx_vnni"}) is None
    assert int8_compute_warning(INT8, machine="aarch64", flags=set()) is None
    assert int8_compute_warning({"compute": {"matmul": "fp32"}}, machine="x86_64", flags=set()) is None
    assert int8_compute_warning({}, machine="x86_64", flags=set()) is None  # exported before compute was recorded


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512_vnni"}
    assert cpu_flags(tmp_path / "missing") is None
    arm = tmp_path / "cpuinfo-arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\n")
    assert cpu_flags(arm) == {"fp", "asimd", "asimddp", "i8mm"}
