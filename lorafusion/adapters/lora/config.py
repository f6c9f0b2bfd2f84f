"""LoRA (Hu et al. 2021) and rsLoRA (Kalajdzievski 2023) configurations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from lorafusion.adapters.base import AdapterConfig
from lorafusion.validation import is_number

__all__ = ["LoRAConfig", "RsLoRAConfig"]


@dataclass(kw_only=True)
class LoRAConfig(AdapterConfig):
    """ΔW = (alpha / rank) · B A, A [rank, in] Kaiming-uniform, B [out, rank] zero (PEFT's init)."""

    type: ClassVar[str] = "lora"
    rank: int = 16
    """Inner dimension r of A and B (≥ 1)."""
    alpha: float = 32.0
    """Scale numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input, in [0, 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"adapter.rank={self.rank!r} must be a positive integer, e.g. rank: 16")
        if not is_number(self.alpha) or self.alpha <= 0:
            raise ValueError(f"adapter.alpha={self.alpha!r} must be a positive number, e.g. alpha: 32")
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter.dropout={self.dropout!r} must be in [0, 1), e.g. dropout: 0.05")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(kw_only=True)
class RsLoRAConfig(LoRAConfig):
    """Rank-stabilised LoRA: the update is scaled by alpha / sqrt(rank) instead of alpha / rank."""

    type: ClassVar[str] = "rslora"

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank)
