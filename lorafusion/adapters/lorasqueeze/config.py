"""In-training LoRA-Squeeze (Vulić et al., arXiv 2602.10993): a LoRA trained at a high rank and annealed to a lower
one during the job by truncated-SVD re-factorisation, exported as a plain LoRA of the lower rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lorafusion.adapters.base import AdapterConfig
from lorafusion.adapters.lora import LoRAConfig

__all__ = ["LoRASqueezeConfig"]


def _check_int(name: str, value: Any, low: int, bound: str, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"adapter.{name}={value!r} must be an integer {bound}, e.g. {name}: {example}")


@dataclass(kw_only=True)
class LoRASqueezeConfig(LoRAConfig):
    """LoRA (ΔW = alpha/rank · B A) whose rank falls linearly from `rank` to `target_rank` between optimizer steps
    squeeze_start_step and squeeze_end_step.

    Each step that lowers the scheduled rank r_t replaces (A, B) by the rank-r_t truncated SVD of s·B A, split evenly
    (B = U √(Σ/s), A = √(Σ/s) Vᵀ), padded with zero rows of A and columns of B: parameter shapes stay (rank), so
    checkpoints and the fused kernels see a constant shape. A zero row of A and the same column of B get exactly
    zero gradients, so the dropped directions stay zero; their Adam moments no longer apply to the rotated basis, so
    the re-factored parameters' optimizer state is reset (after_step returns them). Exported as a plain LoRA of
    target_rank with the same scale s (alpha · target_rank / rank); a job that stops before squeeze_end_step exports
    the best rank-target_rank LoRA of its ΔW, as `lf.squeeze` would.
    [GUESS] The paper (abstract) anneals "gradually"; the linear schedule, the even factor split and the moment
    reset are our choices (docs/variants.md, "LoRA-Squeeze")."""

    type: ClassVar[str] = "lorasqueeze"
    peft_types: ClassVar[tuple[str, ...]] = ()
    target_rank: int | None = None
    """Rank the adapter is annealed to and exported at, 1 ≤ target_rank ≤ rank (required)."""
    squeeze_start_step: int = 0
    """Optimizer steps trained at the full `rank` before annealing starts."""
    squeeze_end_step: int | None = None
    """Optimizer step after which the rank is target_rank (required, ≥ squeeze_start_step; equal: one squeeze)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("target_rank", self.target_rank, 1, f"in [1, rank={self.rank}]", str(max(self.rank // 4, 1)))
        if self.target_rank > self.rank:
            raise ValueError(f"adapter.target_rank={self.target_rank} is above adapter.rank={self.rank}; squeezing "
                             f"lowers the rank: choose target_rank ≤ {self.rank}")
        _check_int("squeeze_start_step", self.squeeze_start_step, 0, "≥ 0", "0")
        _check_int("squeeze_end_step", self.squeeze_end_step, self.squeeze_start_step,
                   f"≥ squeeze_start_step={self.squeeze_start_step}", str(self.squeeze_start_step + 100))

    def rank_at(self, step: int) -> int:
        """The scheduled rank after `step` optimizer steps: rank until squeeze_start_step, target_rank from
        squeeze_end_step on, falling linearly (rounded up) in between."""
        if step >= self.squeeze_end_step:
            return self.target_rank
        if step <= self.squeeze_start_step:
            return self.rank
        done = (step - self.squeeze_start_step) / (self.squeeze_end_step - self.squeeze_start_step)
        return self.rank - int((self.rank - self.target_rank) * done)

    def export_config(self) -> AdapterConfig:
        return LoRAConfig(rank=self.target_rank, alpha=self.scaling * self.target_rank, dropout=self.dropout,
                          target_modules=list(self.target_modules))
