"""Hydra (Kim et al. 2023, arXiv 2309.06922): a parallel and a sequential low-rank branch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lorafusion.adapters.base import AdapterConfig
from lorafusion.adapters.lora import LoRAConfig

__all__ = ["HydraConfig"]


@dataclass(kw_only=True)
class HydraConfig(LoRAConfig):
    """y = W x + b + s·B_p A_p x + s·B_s A_s (W x), s = alpha / rank: a parallel branch on the input (A_p [r, in])
    and a sequential one on the base output (A_s [r, out]), so ΔW = s·(B_p A_p + B_s A_s W), rank ≤ 2r. The down
    projections start Xavier-uniform, the up projections at zero (the authors' extremebird/Hydra).

    The sequential branch acts on W x without the base bias (Llama has none; Qwen2's q/k/v do): the authors'
    merge also moves the bias through B_s A_s, which would need PEFT's lora_bias. Without it ΔW is a pure weight
    update and the export is exact on every family: a plain LoRA of rank 2r, A' = [A_p; A_s W], B' = [B_p, B_s],
    alpha 2·alpha. Dropout, when set, is on x for both branches (the sequential one sees W·dropout(x)), as that
    LoRA computes it."""

    type: ClassVar[str] = "hydra"
    peft_types: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> AdapterConfig | None:
        return None  # exported as a plain LoRA: it reads back as one

    def export_config(self) -> AdapterConfig:
        return LoRAConfig(rank=2 * self.rank, alpha=2 * self.alpha, dropout=self.dropout,
                          target_modules=list(self.target_modules))
