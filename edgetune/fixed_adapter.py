"""Fixed adapter tensors: part of the adapter, never trained (FFA-LoRA's A, ``export --freeze-a``).

With ``freeze_a`` every LoRA A stays at its seeded Kaiming-uniform init: the training graph holds
it as a frozen fp32 initializer (never quantized), only B is a trainable tensor, so deltas carry
B alone (half the upload) and FedAvg of B is exact (every device shares A: mean(B_i) A = mean(B_i A)).
A is still needed wherever the whole adapter is (generation, merge, a PEFT folder), so the
manifest and the bundle record it:

    manifest.frozen[i].peft_key    set only for fixed adapter tensors (base weights have none)
    fixed_adapter.safetensors      graph name -> exact fp32 value, hashed in the manifest like every
                                   file (the same values are in the ORT checkpoint as frozen
                                   parameters; this small file is read without loading it)

No torch here: the device reads it to generate and merge, ``to-peft`` to write lora_A.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgetune.errors import BundleError

FIXED_FILE = "fixed_adapter.safetensors"


def fixed_tensors(manifest) -> list:
    """The manifest's fixed adapter tensors (frozen TensorInfo with a PEFT key), in graph order."""
    return [t for t in manifest.frozen if t.peft_key]


def read_fixed(bundle: Path | str, manifest) -> dict[str, np.ndarray]:
    """The fixed tensors by graph name ({} for a bundle without any); shapes checked against the manifest."""
    from safetensors.numpy import load_file

    entries = fixed_tensors(manifest)
    if not entries:
        return {}
    path = Path(bundle) / FIXED_FILE
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors' error class is not public; OSError for a missing file
        raise BundleError(f"bundle {str(bundle)!r}: cannot read {FIXED_FILE} ({exc}); copy or re-export the bundle.") from None
    bad = [t.graph_name for t in entries
           if t.graph_name not in tensors or list(tensors[t.graph_name].shape) != list(t.shape)]
    if bad:
        raise BundleError(f"bundle {str(bundle)!r}: {FIXED_FILE} lacks or misshapes {len(bad)} tensor(s) "
                          f"(e.g. {bad[0]}); re-export the bundle.")
    return {t.graph_name: np.asarray(tensors[t.graph_name], dtype=np.float32) for t in entries}


def read_fixed_peft(bundle: Path | str, manifest) -> dict[str, np.ndarray]:
    """The fixed tensors by PEFT key: what a PEFT folder needs besides the trained ones."""
    by_graph = read_fixed(bundle, manifest)
    return {t.peft_key: by_graph[t.graph_name] for t in fixed_tensors(manifest)}


def write_fixed(folder: Path, values: dict[str, np.ndarray]) -> None:
    """Exporter side: ``values`` (graph name -> array) into ``folder/fixed_adapter.safetensors``."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in values.items()}, str(Path(folder) / FIXED_FILE))
