"""Between a bundle and a store: ``collect init`` (round 0 = the bundle's initial adapter) and
``collect export`` (a round's global adapter as a PEFT folder or a delta file)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgetune.errors import EdgetuneError
from edgetune.federated.aggregate import space_for
from edgetune.federated.store import Store


def init_store(bundle: Path, folder: Path) -> Store:
    """A new store for ``bundle``: records base hash, method, tensor layout; round 0 = its initial adapter."""
    from edgetune.bundle import Bundle
    from edgetune.delta import encode_delta, read_delta
    from edgetune.runtime.adapter_source import initial_adapter

    opened = Bundle.open(bundle)
    manifest = opened.manifest
    by_graph = initial_adapter(opened)
    tensors = {t.peft_key: by_graph[t.graph_name] for t in manifest.trainable}
    method = {"name": manifest.method["name"], "config": manifest.method["config"]}
    layout = {k: list(v) for k, v in manifest.trainable_shapes().items()}
    data = encode_delta(tensors, base_model_sha256=manifest.base_sha256, method=method, codec="fp32",
                        round_id="0", producer={"collector_round": "initial"})
    meta = {"base_model_sha256": manifest.base_sha256, "method": method, "layout": layout,
            "space": space_for(method, layout), "rank": method["config"].get("rank"),
            "manifest": manifest.to_dict(), "bundle": str(Path(bundle).resolve()),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return Store.create(folder, meta, data, read_delta(data).sha256)


def round_number(store: Store, which: str) -> int:
    """``latest`` (the newest global: the open round's) or a round number that exists."""
    current = store.current_round().round
    if which == "latest":
        return current
    if not which.isdigit() or int(which) > current:
        raise EdgetuneError(f"--round {which!r}: give `latest` or a round number from 0 to {current}.")
    return int(which)


def global_tensors(store: Store, n: int) -> dict[str, np.ndarray]:
    from edgetune.delta import read_delta

    return read_delta(store.read_blob(store.round(n).global_blob)).tensors


def export_peft(store: Store, n: int, bundle: Path, out: Path, force: bool = False) -> None:
    """Round n's global adapter as a PEFT folder for ``bundle`` (which must be the store's bundle)."""
    from edgetune.bundle import Bundle
    from edgetune.delta import AdapterTarget
    from edgetune.methods import get_method
    from edgetune.peft_io import write_peft_adapter
    from edgetune.runtime.adapter_source import initial_adapter

    opened = Bundle.open(bundle)
    manifest = opened.manifest
    problems = []
    if manifest.base_sha256 != store.meta("base_model_sha256"):
        problems.append(f"its base model is {manifest.base_sha256[:16]}…, the store's is "
                        f"{store.meta('base_model_sha256')[:16]}…")
    layout = {k: tuple(v) for k, v in store.meta("layout").items()}
    if manifest.trainable_shapes() != layout:
        problems.append("its trainable tensors differ from the store's")
    if problems:
        raise EdgetuneError(f"--bundle {bundle} is not the bundle this store was made from: {'; '.join(problems)}; "
                            "give that bundle.")
    tensors = {**fixed_peft_tensors(opened), **global_tensors(store, n)}
    spec = get_method(manifest.method["name"])  # full fine-tuning: differences from the base
    tensors = spec.from_delta(tensors, lambda: AdapterTarget.of(manifest).by_peft(initial_adapter(opened)))
    write_peft_adapter(out, manifest, tensors, force=force)


def fixed_peft_tensors(bundle) -> dict[str, np.ndarray]:
    """Adapter tensors the bundle holds frozen (e.g. A under FFA-LoRA): PEFT needs them, devices never ship them.

    They are the frozen tensors with a PEFT key; their exact values are the bundle's
    ``fixed_adapter.safetensors`` (``edgetune.fixed_adapter``, the one reader the device uses too).
    """
    from edgetune.fixed_adapter import read_fixed_peft

    return read_fixed_peft(bundle.folder, bundle.manifest)
