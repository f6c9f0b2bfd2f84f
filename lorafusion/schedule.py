"""The learning-rate schedule a JobSpec describes (its optimizer steps it; a checkpoint records its next value)."""

from __future__ import annotations

import math

from lorafusion.config import JobSpec

__all__ = ["lr_at"]


def lr_at(spec: JobSpec, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based) out of `total_steps`."""
    peak = spec.learning_rate
    if step < spec.warmup_steps:
        return peak * (step + 1) / spec.warmup_steps
    if spec.lr_schedule == "constant":
        return peak
    # Decay reaches min_lr_ratio·peak after the last step, so the last step still learns.
    decay_steps = max(total_steps - spec.warmup_steps, 1)
    progress = min((step - spec.warmup_steps) / decay_steps, 1.0)
    floor = spec.min_lr_ratio
    if spec.lr_schedule == "linear":
        return peak * (1.0 - (1.0 - floor) * progress)
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))
