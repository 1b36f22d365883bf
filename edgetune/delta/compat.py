"""Does a delta fit a bundle? And differences between adapters (``--since``)."""

from __future__ import annotations

import numpy as np

from edgetune.errors import DeltaError


def check_compatible(delta, *, base_model_sha256: str, method: dict, expected_shapes: dict[str, tuple]) -> None:
    """Refuse a delta for another base model, method, hyper-parameters or tensor set; all problems at once."""
    problems = []
    if delta.header["base_model_sha256"] != base_model_sha256:
        problems.append(f"it was trained on base model {delta.header['base_model_sha256'][:16]}…, "
                        f"this bundle's base is {base_model_sha256[:16]}…")
    theirs = delta.header["method"]
    if theirs.get("name") != method["name"]:
        problems.append(f"method {theirs.get('name')!r} != the bundle's {method['name']!r}")
    else:
        for key in sorted(set(theirs.get("config", {})) | set(method["config"])):
            if key == "seed":
                continue
            a, b = theirs.get("config", {}).get(key), method["config"].get(key)
            if a != b:
                problems.append(f"{method['name']} {key} {a!r} != the bundle's {b!r}")
    tensors = delta.tensors
    missing, unexpected = sorted(set(expected_shapes) - set(tensors)), sorted(set(tensors) - set(expected_shapes))
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    for name in sorted(set(tensors) & set(expected_shapes)):
        if tuple(tensors[name].shape) != tuple(expected_shapes[name]):
            problems.append(f"{name} has shape {tuple(tensors[name].shape)}, expected {tuple(expected_shapes[name])}")
    if problems:
        raise DeltaError("the delta does not fit this bundle: " + "; ".join(problems) + ".")


def diff(current: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """current - reference, tensor by tensor (same names and shapes required)."""
    _same_layout(current, reference)
    return {k: (current[k] - reference[k]).astype(np.float32) for k in current}


def apply_diff(reference: dict[str, np.ndarray], difference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    _same_layout(difference, reference)
    return {k: (reference[k] + difference[k]).astype(np.float32) for k in reference}


def _same_layout(a: dict, b: dict) -> None:
    if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
        raise DeltaError("the two adapters have different tensors or shapes; a difference needs the same adapter layout.")
