"""Aggregation of admitted updates into the next global adapter (collector and Flower strategy).

Every update is taken as the change it makes to the global adapter it was trained from
(``adapter - start``), so an update that arrives a round late still moves the current global by
what its device learned. For updates that all start from the current global, FedAvg of the
changes is exactly FedAvg of the adapters: ``G + sum w_i (X_i - G) = sum w_i X_i`` (weights sum to 1).

Where the changes are averaged (``space``):

* ``"tensor"``: tensor by tensor. Exact for LoRA when A is frozen (FFA-LoRA, ``freeze_a``; only
  B is trained): every device's ``B_i A`` shares A, so ``mean(B_i) A = mean(B_i A)``.
* ``"lora-product"``: for LoRA with A and B both trained. Averaging A and B separately is not the
  average of the products (``mean(B_i) mean(A_i) != mean(B_i A_i)``), so each layer's update is
  its product change ``B_i A_i - B_s A_s`` (out, in); the new product ``P = B_g A_g + agg(changes)``
  is re-factorised to the LoRA rank r with a truncated SVD, ``P ~ U_r S_r V_r^T``:
  ``A = a V_r^T`` (r, in) and ``B = U_r S_r / a`` (out, r), where ``a`` is the mean row norm of the
  current global A (A keeps its scale, so training from it behaves like training from the global).
  The energy the truncation drops, ``sum_{j>r} s_j^2 / sum_j s_j^2``, is reported per layer.
  Tensors that are not LoRA A/B pairs are averaged tensor by tensor.

Aggregators: ``fedavg`` (weighted by each update's weight: examples x late discount),
``median`` (coordinate-wise) and ``trimmed-mean`` (coordinate-wise, dropping the ``trim`` fraction
of largest and of smallest values); the robust ones give every device one vote. With DP options
the changes are clipped and noised (``edgetune.federated.privacy``) instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgetune.errors import EdgetuneError
from edgetune.federated.privacy import DPOptions, private_mean

AGGREGATORS = ("fedavg", "median", "trimmed-mean")
SPACES = ("tensor", "lora-product")
_A, _B = ".lora_A.", ".lora_B."


@dataclass(frozen=True)
class AggregationOptions:
    aggregator: str = field(default="fedavg", metadata={"help": "fedavg | median | trimmed-mean"})
    trim: float = field(default=0.1, metadata={"help": "trimmed-mean: fraction cut at each end, in [0, 0.5)"})
    space: str = field(default="tensor", metadata={"help": "tensor | lora-product (see the module doc)"})
    rank: int | None = field(default=None, metadata={"help": "lora-product: the LoRA rank to re-factorise to"})
    dp: DPOptions | None = field(default=None, metadata={"help": "server-side DP (clip + Gaussian noise)"})

    def __post_init__(self) -> None:
        problems = []
        if self.aggregator not in AGGREGATORS:
            problems.append(f"--aggregator must be one of {', '.join(AGGREGATORS)}, got {self.aggregator!r}")
        if not (isinstance(self.trim, (int, float)) and 0 <= self.trim < 0.5):
            problems.append(f"--trim must be in [0, 0.5), got {self.trim!r}")
        if self.space not in SPACES:
            problems.append(f"aggregation space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if self.space == "lora-product" and not (isinstance(self.rank, int) and self.rank > 0):
            problems.append(f"lora-product aggregation needs a positive LoRA rank, got {self.rank!r}")
        if self.dp is not None and self.aggregator != "fedavg":
            problems.append("DP noise is added to a mean: use --aggregator fedavg with --dp-noise-multiplier")
        if problems:
            raise EdgetuneError("; ".join(problems) + ".")


@dataclass
class ClientUpdate:
    """One admitted update: the device's whole adapter after training and where it started."""

    adapter: dict[str, np.ndarray]  # PEFT key -> float32, the global's layout
    start: dict[str, np.ndarray]  # the global adapter the device trained from (same layout)
    weight: float = 1.0  # fedavg weight: examples x late discount; > 0


@dataclass
class AggregationResult:
    tensors: dict[str, np.ndarray]  # the next global adapter, PEFT key -> float32
    report: dict  # JSON-ready: aggregator, space, updates, weights, discarded energy, DP, ...


def lora_pairs(keys) -> dict[str, tuple[str, str]]:
    """layer prefix -> (A key, B key) for every complete LoRA pair among ``keys``."""
    keys = set(keys)
    return {k.split(_A)[0]: (k, k.replace(_A, _B)) for k in sorted(keys) if _A in k and k.replace(_A, _B) in keys}


def space_for(method: dict, layout: dict) -> str:
    """``tensor`` unless the method is LoRA with A and B both trained (then ``lora-product``)."""
    config = method.get("config", {})
    frozen_a = bool(config.get("freeze_a")) or not lora_pairs(layout)
    return "tensor" if method.get("name") != "lora" or frozen_a else "lora-product"


def aggregate(current: dict[str, np.ndarray], updates: list[ClientUpdate], options: AggregationOptions,
              rng: np.random.Generator | None = None) -> AggregationResult:
    """The next global adapter from ``current`` and the admitted ``updates`` (at least one)."""
    if not updates:
        raise EdgetuneError("cannot aggregate a round with no admitted updates.")
    weights = np.array([u.weight for u in updates], dtype=np.float64)
    if options.aggregator == "fedavg" and options.dp is None and not (np.all(weights > 0) and np.isfinite(weights).all()):
        raise EdgetuneError(f"fedavg needs positive finite weights, got {weights.tolist()}.")
    pairs = lora_pairs(current) if options.space == "lora-product" else {}
    paired = {k for ab in pairs.values() for k in ab}
    changes = [_changes(u, pairs, paired) for u in updates]
    report = {"aggregator": options.aggregator, "space": options.space, "updates": len(updates),
              "weights": (weights / weights.sum()).tolist() if options.aggregator == "fedavg" and options.dp is None
              else [1.0 / len(updates)] * len(updates)}
    if options.dp is not None:
        combined, report["dp"] = private_mean(changes, options.dp, rng or np.random.default_rng())
    else:
        combined = {k: _combine([c[k] for c in changes], weights, options) for k in changes[0]}
        if options.aggregator == "trimmed-mean":
            report["trimmed_each_end"] = _trim_count(len(updates), options.trim)
    out = {k: (current[k] + combined[k]).astype(np.float32) for k in current if k not in paired}
    if pairs:
        energy = {}
        for layer, (a_key, b_key) in pairs.items():
            product = current[b_key].astype(np.float64) @ current[a_key].astype(np.float64) + combined[layer]
            out[a_key], out[b_key], energy[layer] = refactorise(product, options.rank, current[a_key])
        report["discarded_energy"] = energy
        report["discarded_energy_max"] = max(energy.values())
    return AggregationResult({k: out[k] for k in current}, report)


def _changes(u: ClientUpdate, pairs: dict, paired: set) -> dict[str, np.ndarray]:
    """The update's change, keyed by tensor (tensor space) or layer prefix (LoRA product, (out, in))."""
    change = {k: u.adapter[k].astype(np.float64) - u.start[k].astype(np.float64) for k in u.adapter if k not in paired}
    for layer, (a_key, b_key) in pairs.items():
        change[layer] = (u.adapter[b_key].astype(np.float64) @ u.adapter[a_key].astype(np.float64)
                         - u.start[b_key].astype(np.float64) @ u.start[a_key].astype(np.float64))
    return change


def _trim_count(n: int, trim: float) -> int:
    return min(int(math.floor(trim * n)), (n - 1) // 2)  # always keep at least one value


def _combine(values: list[np.ndarray], weights: np.ndarray, options: AggregationOptions) -> np.ndarray:
    stack = np.stack(values)  # (updates, *shape)
    if options.aggregator == "fedavg":
        return np.tensordot(weights / weights.sum(), stack, axes=1)
    if options.aggregator == "median":
        return np.median(stack, axis=0)
    k = _trim_count(len(values), options.trim)
    ordered = np.sort(stack, axis=0)
    return ordered[k:len(values) - k].mean(axis=0)


def refactorise(product: np.ndarray, rank: int, current_a: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(A (r, in), B (out, r), discarded energy) with B @ A the best rank-r approximation of ``product``."""
    u, s, vt = np.linalg.svd(product, full_matrices=False)  # u (out, k), s (k,), vt (k, in), k = min(out, in)
    r = min(rank, s.size)
    total = float(np.sum(s ** 2))
    discarded = float(np.sum(s[r:] ** 2)) / total if total > 0 else 0.0
    scale = float(np.mean(np.linalg.norm(current_a, axis=1))) or 1.0
    a = np.zeros((rank, product.shape[1]))
    b = np.zeros((product.shape[0], rank))
    a[:r] = scale * vt[:r]
    b[:, :r] = u[:, :r] * (s[:r] / scale)
    return a.astype(np.float32), b.astype(np.float32), discarded
