"""PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``) without torch.

``write_peft_adapter`` produces what ``peft.PeftModel.from_pretrained(base, folder)`` loads with no
missing or unexpected keys; ``read_peft_adapter`` imports a folder PEFT saved, checking its
config and every tensor against the bundle before anything is used.
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
# adapter_config.json fields that must agree with the bundle's method config, by config field.
_LORA_FIELDS = {"r": "rank", "lora_alpha": "alpha", "use_rslora": "use_rslora"}


def write_peft_adapter(folder: Path, manifest: Manifest, tensors: dict[str, np.ndarray], force: bool = False) -> None:
    """Write ``tensors`` (PEFT key -> array) as a PEFT folder, atomically.

    The files go to a temp folder beside ``folder``, are fsynced, and the temp folder replaces
    ``folder`` (``edgetune.atomic.replace_dir``): an existing folder stays whole until the new one is in
    place, and a failure leaves it as it was; one set aside by a killed write is put back first.
    """
    from safetensors.numpy import save_file

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
        config = dict(manifest.method["peft_config"])
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(tmp / WEIGHTS),
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
    """Read a PEFT LoRA folder for ``manifest``'s bundle; every mismatch is reported at once.

    ``fixed`` (PEFT key -> array): adapter tensors the bundle never trains (``--freeze-a``); the
    folder must hold them with exactly these values (training B against another A is meaningless).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise DeltaError(f"{str(folder)!r} is not a PEFT adapter folder: it needs {CONFIG} and {WEIGHTS} "
                         "(save with `model.save_pretrained(folder)` from PEFT).")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise DeltaError(f"{folder / CONFIG}: not valid JSON ({exc}).") from None
    problems = _config_problems(config, manifest)
    try:
        raw = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise DeltaError(f"{folder / WEIGHTS}: cannot read ({exc}).") from None
    tensors = {_strip_adapter_name(k): v for k, v in raw.items()}
    for key, value in (fixed or {}).items():
        theirs = tensors.pop(key, None)
        if theirs is None or theirs.shape != value.shape or not np.array_equal(theirs.astype(np.float32), value):
            what = "missing" if theirs is None else "not the bundle's fixed value"
            problems.append(f"{key} is {what} (this bundle freezes LoRA A at its seeded init; only adapters "
                            "trained from it fit)")
    expected = manifest.trainable_shapes()
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
        raise DeltaError(f"PEFT adapter {str(folder)!r} does not fit bundle: " + "; ".join(problems) + ".")
    return {k: tensors[k].astype(np.float32) for k in expected}


def _strip_adapter_name(key: str) -> str:
    """PEFT saves without the adapter name; accept ``...lora_A.default.weight`` too."""
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def _config_problems(config: dict, manifest: Manifest) -> list[str]:
    ours = manifest.method["config"]
    problems = []
    if str(config.get("peft_type", "")).upper() != "LORA" or manifest.method["name"] != "lora":
        problems.append(f"peft_type is {config.get('peft_type')!r}, the bundle's method is {manifest.method['name']!r}")
        return problems
    for theirs_key, ours_key in _LORA_FIELDS.items():
        theirs = config.get(theirs_key, False if ours_key == "use_rslora" else None)
        if theirs != ours[ours_key] and not (isinstance(theirs, (int, float)) and float(theirs) == float(ours[ours_key])):
            problems.append(f"{theirs_key} is {theirs!r}, the bundle's is {ours[ours_key]!r}")
    targets = config.get("target_modules") or []
    if sorted(targets) != sorted(ours["targets"]):
        problems.append(f"target_modules are {sorted(targets)}, the bundle's are {sorted(ours['targets'])}")
    return problems
