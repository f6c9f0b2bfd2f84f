"""Cost of a microbatch: a token term, an attention term in Σ len², and a fixed overhead.

    cost = overhead + token_coef · tokens + attn_coef · Σ_samples len²

`tokens` are the microbatch's padded tokens (the GEMMs run over padding rows too); the attention term
is per sample because packed samples attend only within themselves (block-diagonal mask). The default
coefficients are relative (one unit per token) and come from the FLOP ratio of Llama-3.1-8B: per layer
a token costs 2·(4d² + 3·d·d_ff) ≈ 4.9e8 FLOPs in the linear layers, a causal attention pair
2·2·d / 2 = 8192 FLOPs, so attn_coef ≈ 8192 / 4.9e8 ≈ 1.7e-5 per token². `fit_cost_model` replaces
them with seconds fitted to measured step times.

Capacity in cost units enters the CP-SAT model as integers: `CostBudget` scales costs so the capacity
is ~10⁶ units and rounds every item's cost up and the capacity down, so a bin that fits in integer
units also fits in real cost.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["CostModel", "CostBudget", "fit_cost_model", "DEFAULT_ATTN_COEF"]

DEFAULT_ATTN_COEF = 1.7e-5
"""Attention cost of one token² relative to one token's linear-layer cost (Llama-3.1-8B FLOPs, above)."""

_BUDGET_UNITS = 1_000_000
"""Integer units of a cost capacity; rounding each item up costs < 1 unit, i.e. < 1e-6 of the capacity."""


def _finite_nonnegative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"CostModel {name}={value!r} must be a number ≥ 0")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"CostModel {name}={value!r} must be finite and ≥ 0, e.g. 0.0")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class CostModel:
    """Predicted time of one microbatch from its sample lengths (units: whatever the coefficients are in)."""

    token_coef: float = 1.0
    """Cost per (padded) token."""
    attn_coef: float = DEFAULT_ATTN_COEF
    """Cost per token² of each sample (causal attention inside the sample)."""
    overhead: float = 0.0
    """Fixed cost of any non-empty microbatch (kernel launches, optimizer bookkeeping)."""

    def __post_init__(self) -> None:
        for name in ("token_coef", "attn_coef", "overhead"):
            object.__setattr__(self, name, _finite_nonnegative(name, getattr(self, name)))
        if self.token_coef == 0 and self.attn_coef == 0:
            raise ValueError("CostModel token_coef and attn_coef are both 0; a microbatch's cost must grow "
                             "with its tokens, e.g. token_coef=1.0")

    def cost(self, lengths: list[int], padded_tokens: int | None = None) -> float:
        """Cost of a microbatch holding samples of `lengths` (0 for an empty one, a no-op).

        padded_tokens: tokens after padding (default: Σ lengths, no padding).
        """
        if len(lengths) == 0:
            return 0.0
        tokens = sum(lengths) if padded_tokens is None else padded_tokens
        return self.overhead + self.token_coef * tokens + self.attn_coef * sum(n * n for n in lengths)


@dataclass(frozen=True)
class CostBudget:
    """A cost capacity in integer units for the packers: a bin fits when
    block_units · padded blocks + Σ item_units(len) ≤ capacity_units."""

    block_units: int
    """Units of one padded block of pad_multiple tokens (token term, rounded up)."""
    attn_units_per_token2: float
    """Units of one token² (attention term); item_units rounds each sample's product up."""
    capacity_units: int
    """Units of the capacity left after the fixed overhead (rounded down)."""

    @classmethod
    def from_model(cls, model: CostModel, capacity_cost: float, pad_multiple: int) -> CostBudget:
        if isinstance(capacity_cost, bool) or not isinstance(capacity_cost, (int, float)) or not (
                math.isfinite(capacity_cost) and capacity_cost > model.overhead):
            raise ValueError(f"capacity_cost={capacity_cost!r} must be a finite number > the cost model's "
                             f"overhead={model.overhead}, e.g. model.cost([4096])")
        scale = _BUDGET_UNITS / capacity_cost
        return cls(
            block_units=math.ceil(model.token_coef * pad_multiple * scale),
            attn_units_per_token2=model.attn_coef * scale,
            capacity_units=math.floor((capacity_cost - model.overhead) * scale),
        )

    def item_units(self, length: int) -> int:
        """Attention units of one sample of `length` tokens, rounded up."""
        return math.ceil(self.attn_units_per_token2 * length * length)

    def fits(self, blocks: int, item_units: int) -> bool:
        """Whether a bin of `blocks` padded blocks and `item_units` attention units is within the capacity."""
        return self.block_units * blocks + item_units <= self.capacity_units


def fit_cost_model(measurements: list[tuple[list[int], float]]) -> CostModel:
    """Least-squares CostModel (coefficients ≥ 0) from (sample lengths of a microbatch, seconds) pairs.

    Columns Σ len, Σ len², 1; every subset of them is fitted and the non-negative fit with the smallest
    residual kept (exact non-negative least squares for three coefficients). Lengths are taken
    unpadded: measure with the pad_multiple the runtime uses, or pad_multiple=1.
    """
    rows, seconds = [], []
    for i, (lengths, t) in enumerate(measurements):
        if len(lengths) == 0 or any(isinstance(n, bool) or int(n) != n or n <= 0 for n in lengths):
            raise ValueError(f"measurement {i}: lengths {lengths!r} must be a non-empty list of positive integers")
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ValueError(f"measurement {i}: seconds={t!r} must be a finite number > 0")
        rows.append([float(sum(lengths)), float(sum(n * n for n in lengths)), 1.0])
        seconds.append(float(t))
    if len(rows) < 3:
        raise ValueError(f"fit_cost_model got {len(rows)} measurements; give at least 3 (more, with varied "
                         "lengths, fit better)")
    a, y = np.array(rows), np.array(seconds)
    best: tuple[float, np.ndarray] | None = None
    for size in (3, 2, 1):
        for columns in itertools.combinations(range(3), size):
            if 0 not in columns and 1 not in columns:
                continue  # a model without a length term cannot rank microbatches
            coef, *_ = np.linalg.lstsq(a[:, columns], y, rcond=None)
            if np.any(coef < 0):
                continue
            full = np.zeros(3)
            full[list(columns)] = coef
            residual = float(np.sum((a @ full - y) ** 2))
            if best is None or residual < best[0] - 1e-18:
                best = (residual, full)
    if best is None or float(np.mean(a[:, :2] @ best[1][:2])) <= 1e-6 * float(np.mean(y)):
        raise ValueError("fit_cost_model: the times do not grow with the microbatch lengths; measure "
                         "microbatches of different sizes")
    token_coef, attn_coef, overhead = best[1]
    return CostModel(token_coef=float(token_coef), attn_coef=float(attn_coef), overhead=float(overhead))
