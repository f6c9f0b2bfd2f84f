"""Pure planning (no torch): packing jobs' samples into microbatches."""

from scheduler.greedy import first_fit_decreasing

__all__ = ["first_fit_decreasing"]
