"""PaCA (Woo et al. 2025, ICLR): fine-tune r randomly chosen input columns of W itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lorafusion.adapters.base import AdapterConfig
from lorafusion.adapters.lora import LoRAConfig

__all__ = ["PaCAConfig"]


@dataclass(kw_only=True)
class PaCAConfig(AdapterConfig):
    """W_eff is W with its input columns idx replaced by s·P, s = alpha / rank: P [out, rank] trains, starting at
    W[:, idx] / s, so ΔW = s·P − W[:, idx] in those columns and 0 elsewhere (rank ≤ rank). idx is `rank` distinct
    columns drawn by the layer's own generator (job seed, global layer, module), not the global RNG the authors'
    WooSunghyeon/paca uses, so a job's columns do not depend on its neighbours in the run. The backward keeps only
    x[:, idx] of the input. Exported exactly as a plain LoRA of the same rank: A one-hot (A[k, idx_k] = 1),
    B = s·P − W[:, idx], lora_alpha = rank."""

    type: ClassVar[str] = "paca"
    peft_types: ClassVar[tuple[str, ...]] = ()
    rank: int = 16
    """Number of input columns of each module's W that train (≥ 1, at most its in_features)."""
    alpha: float = 16.0
    """Scale numerator: the trained columns are s·P with s = alpha / rank (the authors' paca_alpha)."""

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def check_model(self, shapes: dict[str, tuple[int, int]]) -> None:
        for target, (out, inp) in shapes.items():
            if self.rank > inp:
                raise ValueError(f"adapter.rank={self.rank}: PaCA trains rank input columns of {target}'s {out}×{inp} "
                                 f"weight, which has {inp}; use rank ≤ {inp}")

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> AdapterConfig | None:
        return None  # exported as a plain LoRA: it reads back as one

    def export_config(self) -> AdapterConfig:
        return LoRAConfig(rank=self.rank, alpha=float(self.rank), target_modules=list(self.target_modules))
