"""Device profiles: one TOML file per device class, loaded into a dataclass that checks itself.

The profiles live in the repository's top-level ``devices/`` folder; a wheel carries them as
``edgetune/_devices/`` (``setup.py`` copies them in at build time). ``profiles_folder()`` finds
either. A profile states the memory an app may use there (not the RAM size) with its source, the
cores and SIMD features, the training backends that run there, whether artifacts must be in ORT
format, and a sustained fp32 throughput with its source.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgetune.errors import EdgetuneError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

OSES = ("linux", "android", "ios", "macos", "windows")
ARCHES = ("x86_64", "aarch64")
KNOWN_BACKENDS = ("ort-training", "portable")
KNOWN_SIMD = ("neon", "asimddp", "asimdhp", "i8mm", "sve", "sse4.2", "avx", "avx2", "fma", "avx512f", "avx512_vnni",
              "avx_vnni", "amx")


class ProfileError(EdgetuneError):
    """A device profile is malformed or unknown."""


@dataclass(frozen=True)
class DeviceProfile:
    name: str  # the file's stem: what --device takes
    title: str
    os: str  # one of OSES
    arch: str  # one of ARCHES (iOS/macOS "arm64" is aarch64)
    cores: int
    threads: int  # threads a training run should use there (big cores only on big.LITTLE SoCs)
    simd: tuple[str, ...]
    backends: tuple[str, ...]  # training backends that can run there
    ort_format_required: bool  # app builds there read only ORT-format models
    ram_mb: int  # installed RAM
    app_mb: int  # what one app may use before the OS kills it or the system swaps
    app_mb_source: str
    gflops: float  # sustained fp32 GEMM rate with `threads` threads
    gflops_source: str
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            where = str(self.path) if self.path else f"profile {self.name!r}"
            raise ProfileError(f"{where}: {'; '.join(problems)}. Fix the profile (see devices/README.md).")

    def problems(self) -> list[str]:
        """Every inconsistency at once (empty when the profile is valid)."""
        p: list[str] = []
        if self.os not in OSES:
            p.append(f"os {self.os!r} is not one of {', '.join(OSES)}")
        if self.arch not in ARCHES:
            p.append(f"arch {self.arch!r} is not one of {', '.join(ARCHES)}")
        for key in ("cores", "threads", "ram_mb", "app_mb"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                p.append(f"{key} must be a positive integer, got {value!r}")
        if isinstance(self.threads, int) and isinstance(self.cores, int) and self.threads > self.cores:
            p.append(f"threads ({self.threads}) exceeds cores ({self.cores})")
        if isinstance(self.app_mb, int) and isinstance(self.ram_mb, int) and self.app_mb >= self.ram_mb:
            p.append(f"memory.app_mb ({self.app_mb}) must be below memory.ram_mb ({self.ram_mb}): "
                     "the OS and other apps hold part of the RAM")
        if not isinstance(self.gflops, (int, float)) or isinstance(self.gflops, bool) or self.gflops <= 0:
            p.append(f"throughput.gflops must be a positive number, got {self.gflops!r}")
        for key in ("app_mb_source", "gflops_source", "title"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                p.append(f"{key.replace('app_mb_source', 'memory.source').replace('gflops_source', 'throughput.source')} "
                         "must say where the figure comes from")
        unknown = [s for s in self.simd if s not in KNOWN_SIMD]
        if unknown:
            p.append(f"simd {unknown} not known (known: {', '.join(KNOWN_SIMD)})")
        if self.arch == "aarch64" and any(s in self.simd for s in ("sse4.2", "avx", "avx2", "fma", "avx512f")):
            p.append("simd lists x86 features on an aarch64 device")
        if self.arch == "x86_64" and "neon" in self.simd:
            p.append("simd lists neon on an x86_64 device")
        if not self.backends:
            p.append("backends is empty: name at least one of " + ", ".join(KNOWN_BACKENDS))
        bad = [b for b in self.backends if b not in KNOWN_BACKENDS]
        if bad:
            p.append(f"backends {bad} not known (known: {', '.join(KNOWN_BACKENDS)})")
        if "ort-training" in self.backends and (self.arch != "x86_64" or self.os != "linux"):
            p.append("backend ort-training runs only on x86_64 Linux (onnxruntime-training-cpu 1.19.2 wheels); "
                     "use portable")
        if not isinstance(self.ort_format_required, bool):
            p.append(f"ort_format_required must be true or false, got {self.ort_format_required!r}")
        return p

    @property
    def app_bytes(self) -> int:
        return self.app_mb * 1024 * 1024


TOP_KEYS = {"name", "title", "os", "arch", "cores", "threads", "simd", "backends", "ort_format_required",
            "memory", "throughput"}


def parse_profile(text: str, path: Path) -> DeviceProfile:
    """A profile from TOML ``text`` read from ``path``; every problem is reported at once."""
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML ({exc}); fix the file.") from None
    problems: list[str] = []
    unknown = sorted(set(d) - TOP_KEYS)
    memory = d.get("memory") if isinstance(d.get("memory"), dict) else {}
    throughput = d.get("throughput") if isinstance(d.get("throughput"), dict) else {}
    unknown += [f"memory.{k}" for k in sorted(set(memory) - {"ram_mb", "app_mb", "source"})]
    unknown += [f"throughput.{k}" for k in sorted(set(throughput) - {"gflops", "source"})]
    required = {"title": d, "os": d, "arch": d, "cores": d, "threads": d, "backends": d,
                "ort_format_required": d, "memory.ram_mb": memory, "memory.app_mb": memory,
                "memory.source": memory, "throughput.gflops": throughput, "throughput.source": throughput}
    if unknown:
        problems.append(f"unknown keys {unknown}")
    missing = [k for k, table in required.items() if k.rsplit(".", 1)[-1] not in table]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if d.get("name", path.stem) != path.stem:
        problems.append(f"name {d.get('name')!r} differs from the file name {path.stem!r}")
    if problems:
        raise ProfileError(f"{path}: {'; '.join(problems)}. Fix the profile (see devices/README.md).")
    try:
        return DeviceProfile(
            name=path.stem, title=d["title"], os=d["os"], arch=d["arch"], cores=d["cores"], threads=d["threads"],
            simd=tuple(d.get("simd", [])), backends=tuple(d["backends"]), ort_format_required=d["ort_format_required"],
            ram_mb=memory["ram_mb"], app_mb=memory["app_mb"], app_mb_source=memory["source"],
            gflops=throughput["gflops"], gflops_source=throughput["source"], path=path)
    except TypeError as exc:  # e.g. simd = 3
        raise ProfileError(f"{path}: a field has the wrong type ({exc}). Fix the profile.") from None


def profiles_folder() -> Path:
    """``devices/`` beside the package in a checkout, else ``edgetune/_devices`` in an installed wheel."""
    package = Path(__file__).resolve().parent.parent
    for folder in (package.parent / "devices", package / "_devices"):
        if folder.is_dir() and any(folder.glob("*.toml")):
            return folder
    raise ProfileError(f"no device profiles found (looked in {package.parent / 'devices'} and {package / '_devices'}); "
                       "reinstall edgetune.")


def load_profiles(folder: Path | None = None) -> dict[str, DeviceProfile]:
    folder = folder or profiles_folder()
    return {p.stem: parse_profile(p.read_text(encoding="utf-8"), p) for p in sorted(folder.glob("*.toml"))}


def get_profile(name: str, folder: Path | None = None) -> DeviceProfile:
    """The profile ``name`` (a shipped device class, or a path to a .toml file)."""
    if name.endswith(".toml"):
        path = Path(name)
        if not path.is_file():
            raise ProfileError(f"device profile {name!r}: no such file; give a shipped device name or a .toml profile.")
        return parse_profile(path.read_text(encoding="utf-8"), path)
    folder = folder or profiles_folder()
    path = folder / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(folder.glob("*.toml")))
        raise ProfileError(f"device {name!r} is not a known device profile; choose one of: {known} (or a .toml file).")
    return parse_profile(path.read_text(encoding="utf-8"), path)
