"""DyLoRA (Valipour et al., EACL 2023): LoRA trained at a rank sampled anew each step, so that every leading
sub-adapter of rank b ≤ r works on its own and the rank can be chosen after training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorafusion.adapters.base import AdapterConfig
from lorafusion.adapters.lora import LoRAConfig
from lorafusion.validation import check_positive_int

__all__ = ["DyLoRAConfig"]


@dataclass(kw_only=True)
class DyLoRAConfig(AdapterConfig):
    """Each optimizer step of the job samples one rank b ~ U{1..rank} for all its layers (drawn from (job seed,
    step) alone, so a resumed job samples what an uninterrupted one does) and trains
    ΔW_b = (alpha / b) · B[:, :b] A[:b] (the authors' code slices each factor and scales it by √(rank / b)).
    With `frozen` (the authors' setting) only row b of A and column b of B learn in that step: the first b − 1 are
    detached. At evaluation and in the export the adapter is used at `export_rank`: a plain LoRA of that rank with
    the same alpha. A [rank, in] Kaiming-uniform, B [out, rank] zero, as PEFT's and the authors' LoRA."""

    type: ClassVar[str] = "dylora"
    rank: int = 16
    """Largest rank r; each step trains a leading rank b ≤ r."""
    alpha: float = 32.0
    """Scale numerator: the rank-b update is multiplied by alpha / b."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input, in [0, 1)."""
    frozen: bool = True
    """True: only the sampled rank's row of A and column of B get a gradient (the first b − 1 are detached); false:
    all b of them."""
    export_rank: int | None = None
    """Rank used at evaluation and written to the PEFT export (a plain LoRA of this rank), 1..rank; default: rank."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.frozen, bool):
            raise ValueError(f"adapter.frozen={self.frozen!r} must be true or false, e.g. frozen: true")
        if self.export_rank is None:
            self.export_rank = self.rank
        check_positive_int("adapter.export_rank", self.export_rank, str(self.rank))
        if self.export_rank > self.rank:
            raise ValueError(f"adapter.export_rank={self.export_rank} is larger than adapter.rank={self.rank}; "
                             f"use a rank from 1 to {self.rank}")

    def export_config(self) -> AdapterConfig:
        return LoRAConfig(rank=self.export_rank, alpha=self.alpha, dropout=self.dropout,
                          target_modules=list(self.target_modules))
