"""Evaluation during training: when to evaluate, which evaluation is the best so far, when to stop.

The tracker's whole state is a small dict saved in every checkpoint's trainer.json, so a resumed
run continues with the same best and the same count of evaluations without improvement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

from edgetune.errors import EdgetuneError, TrainingError


@dataclass
class EvalTracker:
    every: int  # evaluate after every N optimizer steps (and after the last one)
    patience: int | None  # stop after this many evaluations in a row without improvement (None: never)
    rank: Callable[[dict], tuple] = field(repr=False, default=lambda m: (-m["loss"],))
    best_step: int | None = None
    best_metrics: dict | None = None
    bad_evals: int = 0  # evaluations since the last improvement

    def __post_init__(self) -> None:
        if self.every <= 0:
            raise EdgetuneError(f"`--eval-every` must be positive, got {self.every}.")
        if self.patience is not None and self.patience <= 0:
            raise EdgetuneError(f"`--early-stop` must be positive, got {self.patience}.")

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total

    def record(self, step: int, metrics: dict) -> bool:
        """Take the evaluation after ``step``; True when it is the best so far (strictly better)."""
        if not all(math.isfinite(v) for v in self.rank(metrics)):
            improved = False
        else:
            improved = self.best_metrics is None or self.rank(metrics) > self.rank(self.best_metrics)
        if improved:
            self.best_step, self.best_metrics, self.bad_evals = step, dict(metrics), 0
        else:
            self.bad_evals += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("rank",)}

    def restore(self, saved, where: str) -> None:
        try:
            self.best_step = None if saved["best_step"] is None else int(saved["best_step"])
            self.best_metrics = None if saved["best_metrics"] is None else {k: float(v) for k, v in saved["best_metrics"].items()}
            self.bad_evals = int(saved["bad_evals"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise TrainingError(f"{where} has no valid evaluation record; the state is damaged — "
                                "pass --restart to start over.") from None
