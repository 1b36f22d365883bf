"""Containment checks for a bundle folder received from elsewhere (untrusted input).

A bundle names files three ways: the manifest's ``files`` keys, ``tokenizer.file`` /
``generation.file``, and the ``location`` of ONNX tensors stored as external data. Each must be a
relative path that stays inside the bundle folder after symlinks are resolved, and each file an
engine opens must be listed in ``files`` (so its SHA-256 is checked). Every problem is collected
and reported in one BundleError.
"""

from __future__ import annotations

import mmap
from pathlib import Path, PurePosixPath

from edgetune.errors import BundleError

# ONNX Runtime reads a training checkpoint's tensors from "<checkpoint>.data" when that file exists
# (checkpoints above 2 GB); it is named by convention, not by the checkpoint, so it must be listed.
CHECKPOINT_EXTERNAL_SUFFIX = ".data"


def path_problem(folder: Path, name: object, what: str) -> str | None:
    """Why ``name`` is not a safe bundle-relative path, or None. ``what`` names it in the message."""
    if not isinstance(name, str) or not name:
        return f"{what} is {name!r}, not a file name"
    pure = PurePosixPath(name)
    if "\\" in name or "\0" in name or pure.is_absolute() or any(p in ("..", ".") for p in name.split("/")):
        return f"{what} {name!r} is not a plain relative path inside the bundle"
    root = folder.resolve()
    target = (folder / name).resolve()
    if target != root and root not in target.parents:
        return f"{what} {name!r} resolves to {str(target)!r}, outside the bundle"
    return None


def check_listed_paths(folder: Path, manifest) -> None:
    """Refuse unsafe names in ``files``, ``tokenizer.file`` and ``generation.file``, unlisted role
    files, and listed files that are missing or not regular files."""
    problems: list[str] = []
    files = manifest.files
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise BundleError(f"bundle {str(folder)!r}: manifest `files` must map file names to SHA-256 strings; "
                          "re-export the bundle.")
    for name in files:
        if (problem := path_problem(folder, name, "`files` entry")) is not None:
            problems.append(problem)
    named = [("`tokenizer.file`", getattr(manifest.tokenizer, "file", None))]
    if manifest.generation is not None:
        named.append(("`generation.file`", getattr(manifest.generation, "file", None)))
    for what, name in named:
        if (problem := path_problem(folder, name, what)) is not None:
            problems.append(problem)
        elif name not in files:
            problems.append(f"{what} {name!r} is not listed in `files` (so it cannot be verified)")
    if problems:
        raise BundleError(f"bundle {str(folder)!r} is refused: {'; '.join(problems)}. Use a bundle written by `edgetune export`.")
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise BundleError(f"bundle {str(folder)!r} is incomplete: missing {', '.join(missing)}; re-export or copy it again.")
    sidecar = "checkpoint" + CHECKPOINT_EXTERNAL_SUFFIX
    if "checkpoint" in files and (folder / sidecar).exists() and sidecar not in files:
        raise BundleError(f"bundle {str(folder)!r} is refused: {sidecar} would be read with the checkpoint but is not "
                          "listed in `files`. Use a bundle written by `edgetune export`.")


def check_external_data(folder: Path, manifest, names=None) -> set[str]:
    """Refuse ONNX graphs whose external-data tensors name a file outside the bundle or not in ``files``;
    return the bundle-relative names those tensors read (so a caller hashing only some files hashes them too).

    ``names``: the listed files to check (default all); graphs a command never opens need no check.

    Graphs are parsed without their external data (nothing but the listed graph file is read), and
    only when they can hold a reference at all: a tensor's external data is found by its
    ``location`` key (by ONNX Runtime too), and those bytes must appear in the file whatever the
    encoding, so a graph without them is skipped. Parsing costs more than hashing (0.5 s against
    0.3 s for a 150 MB graph), and the exporter's graphs keep their weights inline.
    """
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    problems: list[str] = []
    referenced: set[str] = set()
    for name in manifest.files if names is None else names:
        if not name.endswith(".onnx") or not may_reference_external_data(folder / name):
            continue
        try:
            model = onnx.load(str(folder / name), load_external_data=False)
        except Exception as exc:  # protobuf raises its own DecodeError; anything unreadable is refused
            problems.append(f"{name} is not a readable ONNX graph ({type(exc).__name__})")
            continue
        graph_dir = PurePosixPath(name).parent
        locations = set()
        for tensor in _get_all_tensors(model):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                entries = {e.key: e.value for e in tensor.external_data}
                locations.add(entries.get("location", ""))
        for location in sorted(locations):
            relative = str(graph_dir / location) if str(graph_dir) != "." else location
            what = f"{name}: external data of a tensor"
            problem = path_problem(folder, location, what) or path_problem(folder, relative, what)
            if problem is not None:
                problems.append(problem)
            elif str(PurePosixPath(relative)) not in manifest.files:
                problems.append(f"{what} is {location!r}, which is not listed in `files` (so it cannot be verified)")
            else:
                referenced.add(str(PurePosixPath(relative)))
    if problems:
        raise BundleError(f"bundle {str(folder)!r} is refused: {'; '.join(problems)}. Use a bundle written by `edgetune export`.")
    return referenced


def may_reference_external_data(path: Path) -> bool:
    with open(path, "rb") as f:
        if path.stat().st_size == 0:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return data.find(b"location") != -1
