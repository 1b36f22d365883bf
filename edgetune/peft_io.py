"""Ecosystem adapter folders (PEFT: ``adapter_config.json`` + ``adapter_model.safetensors``) without torch.

``write_peft_adapter`` produces what ``peft.PeftModel.from_pretrained(base, folder)`` loads with no
missing or unexpected keys; ``read_peft_adapter`` imports a folder PEFT saved, checking its
config and every tensor against the bundle before anything is used. The file names, the config's
checks, the key spelling and the tensors' layout are the method's (``MethodSpec.folder_*``):
bottleneck adapters go to AdapterHub's layout (``adapter_config.json`` + ``adapter.safetensors``),
prefix tuning to PEFT's one ``prompt_embeddings`` tensor, the same way.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgetune.atomic import recover_dir, replace_dir
from edgetune.bundle import Manifest
from edgetune.errors import DeltaError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def _spec(manifest: Manifest):
    from edgetune.methods import get_method

    return get_method(manifest.method["name"])


def write_peft_adapter(folder: Path, manifest: Manifest, tensors: dict[str, np.ndarray], force: bool = False) -> None:
    """Write ``tensors`` (PEFT key -> array) as a PEFT folder, atomically.

    The files go to a temp folder beside ``folder``, are fsynced, and the temp folder replaces
    ``folder`` (``edgetune.atomic.replace_dir``): an existing folder stays whole until the new one is in
    place, and a failure leaves it as it was; one set aside by a killed write is put back first.
    """
    from safetensors.numpy import save_file

    spec = _spec(manifest)
    folder = Path(folder)
    try:
        recover_dir(folder)  # a folder set aside by a write killed mid-swap is put back first
    except OSError as exc:
        raise DeltaError(f"cannot restore {folder} set aside by an interrupted write: {exc.strerror or exc}.") from None
    if os.path.lexists(folder) and not force:
        raise DeltaError(f"output folder {str(folder)!r} already exists; pass --force to replace it or choose another --out.")
    if os.path.lexists(folder) and (folder.is_symlink() or not folder.is_dir()):
        raise DeltaError(f"output {str(folder)!r} exists and is not a folder (a file or a link); --force replaces only "
                         "a folder. Choose another --out.")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    except OSError as exc:
        raise DeltaError(f"cannot write {folder}: {exc.strerror or exc}; nothing was written. Choose a writable folder.") from None
    try:
        configs = {spec.folder_config_file: dict(manifest.method["peft_config"]), **spec.folder_extra_configs(manifest)}
        for name, config in configs.items():
            (tmp / name).write_text(json.dumps(config, indent=2) + "\n")
        for name, part in spec.folder_weight_files(manifest, spec.folder_tensors(manifest, tensors)).items():
            save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in part.items()}, str(tmp / name),
                      metadata={"format": "pt", "edgetune_base_sha256": manifest.base_sha256})
        replace_dir(tmp, folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
        raise DeltaError(f"cannot write {folder}: {'the disk is full' if full else exc.strerror or exc}; "
                         "nothing was changed there.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_peft_adapter(folder: Path, manifest: Manifest, fixed: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Read a saved adapter folder (PEFT, or the method's ecosystem) for ``manifest``'s bundle;
    every mismatch is reported at once.

    ``fixed`` (PEFT key -> array): adapter tensors the bundle never trains (``--freeze-a``); the
    folder must hold them with exactly these values (training B against another A is meaningless).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    spec = _spec(manifest)
    folder = Path(folder)
    config_path = folder / spec.folder_config_file
    weights_paths = [folder / name for name in spec.folder_weight_names(manifest)]
    if not config_path.is_file() or not all(p.is_file() for p in weights_paths):
        raise DeltaError(f"{str(folder)!r} is not a {spec.ecosystem} adapter folder for a {spec.name} bundle: it needs "
                         f"{' and '.join(p.name for p in [config_path, *weights_paths])} (save it with safetensors "
                         f"from {spec.ecosystem}{spec.folder_save_hint(manifest)}).")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise DeltaError(f"{config_path}: not valid JSON ({exc}).") from None
    if not isinstance(config, dict):
        raise DeltaError(f"{config_path}: expected a JSON object, got {type(config).__name__}.")
    problems = spec.folder_config_problems(config, manifest)
    raw = {}
    for weights_path in weights_paths:
        try:
            raw.update(load_file(str(weights_path)))
        except (SafetensorError, OSError) as exc:
            raise DeltaError(f"{weights_path}: cannot read ({exc}).") from None
    tensors = {spec.folder_key(k): v for k, v in raw.items()}
    for key, value in (fixed or {}).items():
        theirs = tensors.pop(key, None)
        if theirs is None or theirs.shape != value.shape or not np.array_equal(theirs.astype(np.float32), value):
            what = "missing" if theirs is None else "not the bundle's fixed value"
            problems.append(f"{key} is {what} (this bundle freezes LoRA A at its seeded init; only adapters "
                            "trained from it fit)")
    expected = spec.folder_shapes(manifest)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''} ({len(missing)})")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:3])}{' …' if len(unexpected) > 3 else ''} ({len(unexpected)})")
    for key in sorted(set(expected) & set(tensors)):
        if tuple(tensors[key].shape) != expected[key]:
            problems.append(f"{key} has shape {tuple(tensors[key].shape)}, the bundle needs {expected[key]}")
        elif not np.isfinite(tensors[key]).all():
            problems.append(f"{key} holds NaN or Inf values")
    if problems:
        raise DeltaError(f"{spec.ecosystem} adapter {str(folder)!r} does not fit bundle: " + "; ".join(problems) + ".")
    return spec.from_folder_tensors(manifest, {k: tensors[k].astype(np.float32) for k in expected})

