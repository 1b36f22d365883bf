"""Server-side differential privacy for one aggregation round: clip, add Gaussian noise, account.

The mechanism (DP-FedAvg, McMahan et al. 2018, "Learning differentially private recurrent
language models"): every update is clipped to L2 norm ``clip`` (so one device changes the sum by
at most ``clip``), the clipped updates are summed with equal weight, Gaussian noise with standard
deviation ``noise_multiplier * clip`` is added to the sum, and the sum is divided by the number
of updates. Per-device example counts are ignored (they would change the sensitivity).

Accounting: a Gaussian mechanism with noise multiplier z satisfies rho-zCDP with rho = 1 / (2 z^2)
(Bun & Steinke 2016, "Concentrated differential privacy", Prop. 1.6); rounds compose by adding
rho (Lemma 2.3), and rho-zCDP implies (eps, delta)-DP with eps = rho + 2 sqrt(rho ln(1/delta))
(Prop. 1.3). The bound is device-level (add/remove one device's update) and takes no credit for
sampling: devices choose to take part, they are not sampled by the server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgetune.errors import EdgetuneError

ACCOUNTANT = "zCDP of the Gaussian mechanism (Bun & Steinke 2016): rho = rounds / (2 z^2), eps = rho + 2 sqrt(rho ln(1/delta))"


@dataclass(frozen=True)
class DPOptions:
    noise_multiplier: float = field(metadata={"help": "z: noise standard deviation / clip norm"})
    clip: float = field(metadata={"help": "C: every update is scaled down to L2 norm <= C"})
    delta: float = field(default=1e-5, metadata={"help": "the delta of the reported (eps, delta)"})

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.noise_multiplier, (int, float)) and self.noise_multiplier > 0
                and math.isfinite(self.noise_multiplier)):
            problems.append(f"--dp-noise-multiplier must be a positive number, got {self.noise_multiplier!r}")
        if not (isinstance(self.clip, (int, float)) and self.clip > 0 and math.isfinite(self.clip)):
            problems.append(f"--dp-clip must be a positive number, got {self.clip!r}")
        if not (isinstance(self.delta, float) and 0 < self.delta < 1):
            problems.append(f"the DP delta must be in (0, 1), got {self.delta!r}")
        if problems:
            raise EdgetuneError("; ".join(problems) + ".")


def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """(eps, delta)-DP epsilon after ``rounds`` Gaussian rounds with noise multiplier z (zCDP)."""
    return epsilon_from_rho(rounds / (2.0 * noise_multiplier ** 2), delta)


def epsilon_from_rho(rho: float, delta: float) -> float:
    """(eps, delta)-DP implied by rho-zCDP; rounds with different noise add their rho."""
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def global_norm(arrays: dict[str, np.ndarray]) -> float:
    """L2 norm over every value of every array (float64 accumulation)."""
    return math.sqrt(sum(float(np.dot(a.ravel().astype(np.float64), a.ravel().astype(np.float64)))
                         for a in arrays.values()))


def clip_to_norm(arrays: dict[str, np.ndarray], bound: float) -> tuple[dict[str, np.ndarray], float, bool]:
    """(arrays scaled to L2 norm <= bound, the norm before, whether it was scaled)."""
    norm = global_norm(arrays)
    if norm <= bound:
        return arrays, norm, False
    factor = bound / norm
    return {k: (a * factor).astype(np.float32) for k, a in arrays.items()}, norm, True


def private_mean(updates: list[dict[str, np.ndarray]], options: DPOptions,
                 rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict]:
    """Equal-weight mean of the clipped updates plus Gaussian noise; returns (mean, report)."""
    n = len(updates)
    clipped, count = [], 0
    for u in updates:
        c, _, was = clip_to_norm(u, options.clip)
        clipped.append(c)
        count += was
    sigma = options.noise_multiplier * options.clip  # on the sum; sensitivity of the sum is `clip`
    mean = {}
    for key in updates[0]:
        total = np.sum([c[key].astype(np.float64) for c in clipped], axis=0)
        mean[key] = ((total + rng.normal(0.0, sigma, size=total.shape)) / n).astype(np.float32)
    report = {"noise_multiplier": options.noise_multiplier, "clip": options.clip, "clipped_updates": count,
              "noise_std_of_mean": sigma / n, "delta": options.delta,
              "epsilon_round": epsilon(options.noise_multiplier, 1, options.delta), "accountant": ACCOUNTANT}
    return mean, report
