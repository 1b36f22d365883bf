"""From a delta file to the adapter a bundle can use: one path for the CLI, ``sync`` and the collector.

``resolve_delta(source, target, since=..., trusted_keys=...)``:

1. verify: framing, checksum, header schema, payload, signature (``trusted_keys``: a signature by
   one of them is required unless ``require_signature=False``);
2. fit: the target's base-model hash, method name and config (all but ``seed``), tensor names and
   shapes;
3. a ``diff`` delta is added to the delta it was made against (``since``, itself read and fitted;
   its checksum must be the diff's ``since_sha256``);
4. the full adapter is returned by PEFT key and by training-graph name.

The target is an ``AdapterTarget`` of plain values or a bundle ``Manifest``; nothing here needs the
bundle folder or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetune.delta.compat import apply_diff, check_compatible
from edgetune.delta.format import Delta, read_delta
from edgetune.errors import DeltaError


@dataclass(frozen=True)
class AdapterTarget:
    """What a delta must fit: ``trainable`` is ((graph_name, peft_key, shape), ...)."""

    base_sha256: str
    method: dict  # {"name": str, "config": {...}}
    trainable: tuple[tuple[str, str, tuple[int, ...]], ...]

    def __post_init__(self):  # plain values from a caller: normalise (lists -> tuples) once
        rows = tuple((str(g), str(p), tuple(int(d) for d in shape)) for g, p, shape in self.trainable)
        object.__setattr__(self, "trainable", rows)
        object.__setattr__(self, "method", {"name": self.method["name"], "config": dict(self.method["config"])})

    @classmethod
    def of(cls, target) -> "AdapterTarget":
        """``target`` itself, or the target of a bundle ``Manifest`` (or of an object holding one as ``.manifest``)."""
        if isinstance(target, AdapterTarget):
            return target
        target = target if hasattr(target, "trainable_shapes") else target.manifest
        graph_names = target.peft_to_graph()  # PEFT key -> training graph name
        trainable = [(graph_names[key], key, shape) for key, shape in target.trainable_shapes().items()]
        return cls(target.base_sha256, target.method, tuple(trainable))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """PEFT key -> shape: the tensors a delta for this target holds."""
        return {peft: shape for _, peft, shape in self.trainable}

    def by_graph(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """PEFT key -> array into graph name -> array (every trainable tensor must be present)."""
        return {graph: tensors[peft] for graph, peft, _ in self.trainable}

    def by_peft(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Graph name -> array into PEFT key -> array."""
        return {peft: tensors[graph] for graph, peft, _ in self.trainable}


@dataclass
class ResolvedAdapter:
    """The full adapter a delta stands for. ``reference``: the ``since`` delta of a diff, else None."""

    delta: Delta
    by_peft: dict[str, np.ndarray]  # PEFT key -> float32 array
    by_graph: dict[str, np.ndarray]  # training graph name -> the same arrays
    reference: Delta | None = None


def fits(delta: Delta, target) -> Delta:
    """``delta`` when it fits ``target`` (AdapterTarget or Manifest); DeltaError listing every mismatch."""
    t = AdapterTarget.of(target)
    check_compatible(delta, base_model_sha256=t.base_sha256, method=t.method, expected_shapes=t.shapes())
    return delta


def read_reference(source, target) -> Delta:
    """A ``--since`` delta (the round's global adapter): read, verified and fitted to ``target``.

    ``source`` is a path, the file's bytes, or an already read ``Delta``.
    """
    delta = source if isinstance(source, Delta) else read_delta(source)
    return fits(delta, target)


def resolve_delta(source, target, *, since=None, trusted_keys: dict | None = None,
                  require_signature: bool | None = None) -> ResolvedAdapter:
    """Verify ``source`` (path or bytes), fit it to ``target``, apply a diff to ``since``; see the module doc.

    ``trusted_keys``: fingerprint -> public key (``load_public_keys``), or None to accept any valid
    signature; ``require_signature`` defaults to "trusted keys were given".
    """
    t = AdapterTarget.of(target)
    if require_signature is None:
        require_signature = trusted_keys is not None  # an empty dict trusts no key: every signed delta is refused
    delta = fits(read_delta(source, trusted_keys=trusted_keys, require_signature=require_signature), t)
    where = _name(source)
    reference = None
    tensors = delta.tensors
    if delta.kind == "diff":
        if since is None:
            raise DeltaError(f"{where} is a difference from delta {delta.since_sha256[:16]}…; pass --since with "
                             "that delta.")
        reference = read_reference(since, t)
        if reference.sha256 != delta.since_sha256:
            raise DeltaError(f"--since {_name(since)} has checksum {reference.sha256[:16]}…, but {where} was made "
                             f"against {delta.since_sha256[:16]}…; give the delta it was made against.")
        tensors = apply_diff(reference.tensors, delta.tensors)
    by_peft = {peft: tensors[peft] for _, peft, _ in t.trainable}
    return ResolvedAdapter(delta, by_peft, t.by_graph(by_peft), reference)


def _name(source) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return "the delta" if not isinstance(source, Delta) else f"delta {source.sha256[:16]}…"
