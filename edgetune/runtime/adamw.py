"""AdamW in numpy, as the bundle's optimizer graph computes it: ``torch.optim.AdamW`` semantics.

The exporter builds ONNX Runtime's ``AdamWOptimizer`` with ``adam_mode=0`` and ``correct_bias=1``,
which is PyTorch's algorithm: weight decay decoupled from the gradient and applied first, then
bias-corrected moments, epsilon added after the square root::

    step += 1
    p   *= 1 - lr * weight_decay
    m    = beta1 * m + (1 - beta1) * g
    v    = beta2 * v + (1 - beta2) * g * g
    p   -= lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)

``g`` is the sum of the micro-batch gradients since the last step (ORT's gradient accumulator adds
them up without scaling). Every array is float32, updated in place; the moments start at zero and
are called ``momentum0`` / ``momentum1`` in ORT checkpoints (``exp_avg`` / ``exp_avg_sq`` in torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgetune.errors import BundleError


@dataclass(frozen=True)
class AdamWHyper:
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    @classmethod
    def from_manifest(cls, optimizer: dict) -> "AdamWHyper":
        """The manifest's ``optimizer`` entry; refuses anything that is not the AdamW the exporter writes."""
        problems = []
        if optimizer.get("name") != "adamw":
            problems.append(f"name is {optimizer.get('name')!r}, not 'adamw'")
        betas = optimizer.get("betas")
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_real(b) and 0 <= b < 1 for b in betas)):
            problems.append(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not (_real(optimizer.get("eps")) and optimizer["eps"] > 0):
            problems.append(f"eps must be positive, got {optimizer.get('eps')!r}")
        if not (_real(optimizer.get("weight_decay")) and optimizer["weight_decay"] >= 0):
            problems.append(f"weight_decay must be >= 0, got {optimizer.get('weight_decay')!r}")
        if problems:
            raise BundleError(f"the bundle's optimizer settings are unusable: {'; '.join(problems)}; re-export the bundle.")
        return cls((float(betas[0]), float(betas[1])), float(optimizer["eps"]), float(optimizer["weight_decay"]))


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class AdamWState:
    """Per-tensor moments (float32, the tensor's shape) and the number of steps taken."""

    exp_avg: dict[str, np.ndarray] = field(default_factory=dict)
    exp_avg_sq: dict[str, np.ndarray] = field(default_factory=dict)
    step: int = 0


def adamw_step(params: dict[str, np.ndarray], grads: dict[str, np.ndarray], state: AdamWState,
               hyper: AdamWHyper, lr: float) -> None:
    """One AdamW update of every tensor in ``params`` (in place), moments created at zero when absent."""
    beta1, beta2 = hyper.betas
    state.step += 1
    # float32 scalars, as the ORT kernel computes them (the arrays are float32 anyway)
    step_size = np.float32(lr / (1.0 - beta1 ** state.step))
    root_correction2 = np.float32(math.sqrt(1.0 - beta2 ** state.step))
    decay = np.float32(1.0 - lr * hyper.weight_decay)
    for name, p in params.items():
        g = grads[name]
        m = state.exp_avg.setdefault(name, np.zeros_like(p))
        v = state.exp_avg_sq.setdefault(name, np.zeros_like(p))
        if hyper.weight_decay:
            p *= decay
        m *= np.float32(beta1)
        m += np.float32(1.0 - beta1) * g
        v *= np.float32(beta2)
        v += np.float32(1.0 - beta2) * (g * g)
        denom = np.sqrt(v) / root_correction2
        denom += np.float32(hyper.eps)
        p -= step_size * (m / denom)
