"""Admission of one update, before anything is stored: pure checks, shared by collector and Flower.

Every refusal is an ``UpdateRefused`` carrying an HTTP status, a short machine reason (what
``collect status`` counts) and a one-line message. The checks, in the order ``admit`` runs them:

=====  ==================  ===============================================================
 409   round_not_open      the update names a round after the current one
 410   stale_round         more than ``max_late`` rounds behind
 400   malformed           not a delta: framing, checksum, header or payload broken
 403   bad_signature       signature does not verify, or is by a key other than the device's
 401   unsigned            the device authenticates by key, but the delta is not signed
 422   non_finite          NaN or Inf values
 422   wrong_base_model / wrong_method / wrong_tensors   does not fit the store's adapter layout
 422   round_mismatch      the delta's own ``round_id`` names another round than its upload
 422   wrong_since         a difference delta made against another adapter than the round's global
 422   no_examples / too_many_examples   fedavg weight out of bounds
 422   norm_too_large      L2 norm of the change above ``max_norm`` with policy ``refuse``
=====  ==================  ===============================================================

Authentication (tokens), idempotency and one update per device per round live in
``collector``; the size cap is enforced by ``server`` while it reads the body. Flower clients send
arrays, not delta files: ``check_tensors``, ``pin_frozen``, ``bound_norm`` and ``update_weight``
are the same checks on plain tensors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from edgetune.errors import EdgetuneError
from edgetune.federated.aggregate import ClientUpdate
from edgetune.federated.privacy import clip_to_norm, global_norm

NORM_POLICIES = ("clip", "refuse")


class UpdateRefused(EdgetuneError):
    """An update the collector will not admit: ``status`` (HTTP), ``reason`` (short code), message."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class StoreSpec:
    """What every update must fit: the store's base model, method and adapter layout."""

    base_model_sha256: str
    method: dict  # {"name", "config"}: as deltas carry it
    layout: dict[str, tuple[int, ...]]  # PEFT key -> shape

    def target(self):
        """The ``AdapterTarget`` deltas are fitted to. The collector works by PEFT key alone (graph names
        play no part in a fit), so each tensor's graph name is its PEFT key."""
        from edgetune.delta.resolve import AdapterTarget

        return AdapterTarget(self.base_model_sha256, self.method,
                             tuple((key, key, tuple(shape)) for key, shape in self.layout.items()))


@dataclass(frozen=True)
class AdmissionPolicy:
    max_norm: float | None = field(default=None, metadata={"help": "bound on the L2 norm of an update's change"})
    norm_policy: str = field(default="refuse", metadata={"help": "above max_norm: clip | refuse"})
    max_late: int = field(default=0, metadata={"help": "accept updates up to this many rounds late"})
    late_discount: float = field(default=0.5, metadata={"help": "fedavg weight x discount^(rounds late)"})
    max_examples: int | None = field(default=None, metadata={"help": "refuse updates claiming more examples"})

    def __post_init__(self) -> None:
        problems = []
        if self.max_norm is not None and not (isinstance(self.max_norm, (int, float)) and self.max_norm > 0
                                              and math.isfinite(self.max_norm)):
            problems.append(f"--max-norm must be a positive number, got {self.max_norm!r}")
        if self.norm_policy not in NORM_POLICIES:
            problems.append(f"--norm-policy must be one of {', '.join(NORM_POLICIES)}, got {self.norm_policy!r}")
        if isinstance(self.max_late, bool) or not isinstance(self.max_late, int) or self.max_late < 0:
            problems.append(f"--max-late must be a whole number >= 0, got {self.max_late!r}")
        if not (isinstance(self.late_discount, (int, float)) and 0 < self.late_discount <= 1):
            problems.append(f"--late-discount must be in (0, 1], got {self.late_discount!r}")
        if self.max_examples is not None and not (isinstance(self.max_examples, int) and self.max_examples > 0):
            problems.append(f"--max-examples must be a positive whole number, got {self.max_examples!r}")
        if problems:
            raise EdgetuneError("; ".join(problems) + ".")


@dataclass
class Admitted:
    """An admitted update, ready to store and later aggregate."""

    update: ClientUpdate  # adapter (possibly clipped), start, weight
    round: int  # the round it was trained for (its start global)
    lateness: int  # current round - round
    num_examples: int
    norm: float  # L2 norm of the change before any clipping
    clipped: bool
    scale: float  # 1.0, or max_norm / norm: the factor the change was scaled by
    loss: float | None  # the device's reported training loss, when it sent one


def parse_delta(body: bytes, public_key=None):
    """A verified ``Delta`` from upload bytes; ``public_key`` (the device's) makes a signature required."""
    from edgetune.delta import fingerprint, read_delta
    from edgetune.errors import DeltaError

    trusted = {fingerprint(public_key): public_key} if public_key is not None else None
    try:
        return read_delta(bytes(body), trusted_keys=trusted, require_signature=public_key is not None)
    except DeltaError as exc:
        raise _classify(str(exc)) from None


def _classify(message: str) -> UpdateRefused:
    """Map read_delta's refusal to a status; its messages are the only structure it exposes."""
    text = message.replace("delta: ", "upload: ", 1)
    if "NaN or Inf" in message:
        return UpdateRefused(422, "non_finite", text)
    if "is not signed" in message:
        return UpdateRefused(401, "unsigned", text + " (this device authenticates with its registered key)")
    if "bad signature" in message or "signed by unknown key" in message:
        return UpdateRefused(403, "bad_signature", text.replace("add its .pub file to the trusted keys if you trust "
                                                                "that device", "it is not this device's key"))
    return UpdateRefused(400, "malformed", text)


def check_round(claimed: int, current: int, policy: AdmissionPolicy) -> int:
    """How many rounds late an update for round ``claimed`` is, when it may still be admitted."""
    if claimed > current:
        raise UpdateRefused(409, "round_not_open", f"round {claimed} is not open yet; the current round is {current}.")
    lateness = current - claimed
    if lateness > policy.max_late:
        raise UpdateRefused(410, "stale_round", f"round {claimed} is over (the current round is {current}, updates "
                                                f"may be at most {policy.max_late} round(s) late); pull the current "
                                                "global adapter and train again.")
    return lateness


def check_fits(delta, spec: StoreSpec, claimed_round: int) -> None:
    """Base model, method and tensors must match the store (``edgetune.delta.resolve.fits``, as every
    command that reads a delta); every mismatch in one refusal, its reason the first kind found."""
    from edgetune.delta.resolve import fits
    from edgetune.errors import DeltaError

    try:
        fits(delta, spec.target())
    except DeltaError as exc:
        header, ours = delta.header, spec.method
        same_config = {k: v for k, v in header["method"].get("config", {}).items() if k != "seed"} == \
            {k: v for k, v in ours["config"].items() if k != "seed"}
        reason = ("wrong_base_model" if header["base_model_sha256"] != spec.base_model_sha256 else
                  "wrong_method" if header["method"].get("name") != ours["name"] or not same_config else
                  "wrong_tensors")
        raise UpdateRefused(422, reason, str(exc).replace("this bundle", "this collector's store")) from None
    round_id = delta.round_id
    if round_id is not None and re.fullmatch(r"\d+", round_id) and int(round_id) != claimed_round:
        raise UpdateRefused(422, "round_mismatch", f"the delta says it is for round {round_id}, but was uploaded to "
                                                   f"round {claimed_round}; upload it to /v1/rounds/{round_id}/updates.")


def check_tensors(tensors: dict[str, np.ndarray], spec: StoreSpec) -> None:
    """Names, shapes and finiteness of plain tensors (a Flower client's arrays); one refusal for all."""
    problems = []
    missing, unexpected = sorted(set(spec.layout) - set(tensors)), sorted(set(tensors) - set(spec.layout))
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
    for name in sorted(set(tensors) & set(spec.layout)):
        if tuple(np.shape(tensors[name])) != tuple(spec.layout[name]):
            problems.append(f"{name} has shape {tuple(np.shape(tensors[name]))}, expected {tuple(spec.layout[name])}")
    if problems:
        raise UpdateRefused(422, "wrong_tensors", "the update does not fit this collector's store: "
                            + "; ".join(problems) + ".")
    bad = sorted(k for k, v in tensors.items() if not np.isfinite(np.asarray(v, dtype=np.float64)).all())
    if bad:
        raise UpdateRefused(422, "non_finite", f"NaN or Inf values in {len(bad)} tensor(s): {', '.join(bad[:3])}.")


def pin_frozen(adapter: dict[str, np.ndarray], start: dict[str, np.ndarray], spec: StoreSpec) -> dict[str, np.ndarray]:
    """Under FFA-LoRA (method config ``freeze_a``) A stays at the global's value, whatever was sent."""
    if not spec.method.get("config", {}).get("freeze_a"):
        return adapter
    return {k: (start[k] if ".lora_A." in k else v) for k, v in adapter.items()}


def full_adapter(delta, start: dict[str, np.ndarray], start_sha256: str) -> dict[str, np.ndarray]:
    """The device's whole adapter: a full delta as is, a difference added to the round's global."""
    if delta.kind == "full":
        return {k: v.astype(np.float32) for k, v in delta.tensors.items()}
    if delta.since_sha256 != start_sha256:
        raise UpdateRefused(422, "wrong_since", f"the difference was made against delta {delta.since_sha256[:16]}…, "
                                                f"not this round's global adapter {start_sha256[:16]}…; make it with "
                                                "`edgetune delta --since` the global adapter of its round.")
    from edgetune.delta import apply_diff

    return apply_diff(start, delta.tensors)


def bound_norm(adapter: dict[str, np.ndarray], start: dict[str, np.ndarray],
               policy: AdmissionPolicy) -> tuple[dict[str, np.ndarray], float, bool]:
    """(adapter with its change within ``max_norm``, the change's norm, whether it was clipped)."""
    change = {k: adapter[k].astype(np.float64) - start[k] for k in start}
    norm = global_norm(change)
    if not math.isfinite(norm):
        raise UpdateRefused(422, "non_finite", "the update's change overflows (its L2 norm is not finite).")
    if policy.max_norm is None or norm <= policy.max_norm:
        return adapter, norm, False
    if policy.norm_policy == "refuse":
        raise UpdateRefused(422, "norm_too_large", f"the update's L2 norm {norm:.4g} is above the bound "
                                                   f"{policy.max_norm:.4g}; train with a smaller learning rate or fewer steps.")
    clipped, _, _ = clip_to_norm(change, policy.max_norm)
    return {k: (start[k] + clipped[k]).astype(np.float32) for k in start}, norm, True


def update_weight(num_examples: int, lateness: int, policy: AdmissionPolicy) -> float:
    """fedavg weight: examples, discounted ``late_discount`` per round late; refuses 0 and too many."""
    if num_examples <= 0:
        raise UpdateRefused(422, "no_examples", "the update was trained on 0 examples (num_examples in its header); "
                                                "train before uploading.")
    if policy.max_examples is not None and num_examples > policy.max_examples:
        raise UpdateRefused(422, "too_many_examples", f"the update claims {num_examples} examples, above this "
                                                      f"collector's --max-examples {policy.max_examples}.")
    return float(num_examples) * policy.late_discount ** lateness


def admit(body: bytes, *, claimed_round: int, current_round: int, spec: StoreSpec, policy: AdmissionPolicy,
          global_of: Callable[[int], tuple[dict[str, np.ndarray], str]], public_key=None) -> Admitted:
    """Run every check on upload ``body`` for round ``claimed_round``.

    ``global_of(n)`` gives round n's global adapter (PEFT key -> array) and its delta checksum;
    ``public_key``: the device's registered Ed25519 key, when it authenticates by signature.
    Raises ``UpdateRefused`` at the first failing check; nothing is stored here.
    """
    check_round(claimed_round, current_round, policy)  # the cheap refusal before parsing
    return admit_delta(parse_delta(body, public_key), claimed_round=claimed_round, current_round=current_round,
                       spec=spec, policy=policy, global_of=global_of)


def admit_delta(delta, *, claimed_round: int, current_round: int, spec: StoreSpec, policy: AdmissionPolicy,
                global_of: Callable[[int], tuple[dict[str, np.ndarray], str]]) -> Admitted:
    """``admit`` for a delta already parsed and verified by ``parse_delta``."""
    lateness = check_round(claimed_round, current_round, policy)
    check_fits(delta, spec, claimed_round)
    start, start_sha256 = global_of(claimed_round)
    adapter = full_adapter(delta, start, start_sha256)
    check_tensors(adapter, spec)
    adapter = pin_frozen(adapter, start, spec)
    weight = update_weight(delta.num_examples, lateness, policy)
    adapter, norm, clipped = bound_norm(adapter, start, policy)
    loss = delta.metrics.get("loss")
    scale = policy.max_norm / norm if clipped else 1.0
    return Admitted(ClientUpdate(adapter, start, weight), claimed_round, lateness, delta.num_examples, norm, clipped,
                    scale, float(loss) if loss is not None else None)
