"""``train --device``: refuse, before the first step, a configuration the plan says will not fit."""

from __future__ import annotations

from edgetune.bundle import Manifest
from edgetune.devices.plan import MB, Prediction, predict
from edgetune.errors import EdgetuneError


class PlanDoesNotFit(EdgetuneError):
    """The predicted peak memory of the training step exceeds what the device lets an app use."""


def fitting_options(manifest: Manifest, budget: int, batch: int, seq: int, limit: int = 3) -> list[Prediction]:
    """Configurations no larger than (batch, seq) that fit ``budget``, most tokens per step first."""
    batches = sorted({b for b in (batch, 16, 8, 4, 2, 1) if b <= batch}, reverse=True)
    seqs = sorted({s for s in (seq, 2048, 1024, 512, 256, 128, 64, 32) if s <= seq}, reverse=True)
    fits = [p for p in (predict(manifest, b, s) for b in batches for s in seqs) if p.peak_bytes <= budget]
    fits.sort(key=lambda p: (p.tokens, p.seq), reverse=True)
    return fits[:limit]


def check_fits(manifest: Manifest, profile, batch: int, seq: int, grad_accum: int = 1) -> Prediction:
    """The prediction for (batch, seq) when it fits ``profile``; else ``PlanDoesNotFit`` with what would."""
    p = predict(manifest, batch, seq, profile.gflops)
    if p.peak_bytes <= profile.app_bytes:
        return p
    options = []
    for o in fitting_options(manifest, profile.app_bytes, batch, seq):
        accum = grad_accum * max(1, batch // o.batch)  # keeps the examples per optimizer step
        options.append(f"--batch-size {o.batch} --max-seq-len {o.seq}"
                       + (f" --grad-accum {accum}" if accum > 1 else "") + f" ({o.peak_bytes / MB:.0f} MB)")
    fix = ("options that fit: " + "; ".join(options)) if options else \
        "nothing up to this batch and length fits: export with --recompute full and --quantize int8, or a smaller model"
    parts = ", ".join(f"{k} {v / MB:.0f} MB" for k, v in p.parts.items())
    raise PlanDoesNotFit(
        f"--batch-size {batch} --max-seq-len {seq} is predicted to need {p.peak_bytes / MB:.0f} MB ({parts}) "
        f"but {profile.name} lets an app use {profile.app_mb} MB; {fix}.")
