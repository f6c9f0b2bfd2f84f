"""Block-LoRA (Zhou et al. 2025, "One Head Eight Arms", arXiv 2501.16720): LoRA's factors cut into blocks whose
down-projections are all one shared block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorafusion.adapters.base import AdapterConfig
from lorafusion.adapters.lora import LoRAConfig
from lorafusion.validation import check_positive_int

__all__ = ["BlockLoRAConfig"]


@dataclass(kw_only=True)
class BlockLoRAConfig(AdapterConfig):
    """LoRA's B [out, rank] cut into `blocks` column blocks B_i [out, rank/blocks] and A [rank, in] into as many row
    blocks, all equal to one shared A_s [rank/blocks, in] (the "one head" and its arms):
    ΔW = (alpha / rank) · Σ_i B_i A_s = (alpha / rank) · (Σ_i B_i) A_s, the paper's product turned into a sum of
    the B_i and one small product.

    Only the abstract was available (no code or method section found): the formula is our reading of "partitions
    the low-rank matrices into sub-matrices while sharing all down-projection sub-matrices" and of "matrix
    multiplication into matrix addition", and the scale is LoRA's alpha / rank at the full rank, so Block-LoRA is
    exactly a LoRA of rank `rank` whose A repeats A_s. A consequence to know: every B_i gets the same gradient
    (alpha/rank · G A_sᵀ), so the B_i differ only by their init; from PEFT's zero init they stay equal and Σ B_i
    moves `blocks` times as far per step as one B would. A_s Kaiming-uniform as PEFT's A, each B_i zero.
    Exported exactly as a plain LoRA of rank rank/blocks: A_s and Σ B_i, alpha / blocks (the same scale)."""

    type: ClassVar[str] = "blocklora"
    rank: int = 16
    """LoRA rank r that the blocks partition; must be a multiple of blocks."""
    alpha: float = 32.0
    """Scale numerator: the update is multiplied by alpha / rank."""
    blocks: int = 8
    """Number n of up-projection blocks B_i (the paper's "arms"); each has rank / blocks columns."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input, in [0, 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("adapter.blocks", self.blocks, "8")
        if self.rank % self.blocks:
            divisors = [d for d in range(1, self.rank + 1) if self.rank % d == 0]
            raise ValueError(f"adapter.blocks={self.blocks} does not divide adapter.rank={self.rank}; use one of "
                             f"{divisors}")

    @property
    def block_rank(self) -> int:
        """Rank of the shared A_s and of each B_i: rank / blocks."""
        return self.rank // self.blocks

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def export_config(self) -> AdapterConfig:
        return LoRAConfig(rank=self.block_rank, alpha=self.alpha / self.blocks, dropout=self.dropout,
                          target_modules=list(self.target_modules))
