"""Learning-rate schedule: linear warm-up from 0, then linear decay to ``final_fraction`` * peak."""

from __future__ import annotations

from dataclasses import dataclass

from edgetune.errors import EdgetuneError


@dataclass(frozen=True)
class LinearSchedule:
    peak: float
    total_steps: int
    warmup_steps: int = 0
    final_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not self.peak > 0:
            raise EdgetuneError(f"`--lr` must be positive, got {self.peak}.")
        if self.total_steps <= 0:
            raise EdgetuneError(f"the run has {self.total_steps} steps; give --steps or --epochs >= 1 and non-empty data.")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise EdgetuneError(f"`--warmup` must be between 0 and the number of steps ({self.total_steps}), got {self.warmup_steps}.")

    def __call__(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.peak * (1.0 - (1.0 - self.final_fraction) * progress)
