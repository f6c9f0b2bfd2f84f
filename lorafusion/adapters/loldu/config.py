"""LoLDU (Shi et al. 2024, arXiv 2410.13618): the base weight's own LDU factors, only a diagonal trains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lorafusion.adapters.base import AdapterConfig
from lorafusion.adapters.lora import LoRAConfig

__all__ = ["LoLDUConfig"]


@dataclass(kw_only=True)
class LoLDUConfig(LoRAConfig):
    """With W = P L D U (partial-pivoting LU of the module's W [out, in] in fp32, D = diag(U), U unit upper):
    ΔW = s·P L_r diag(z − z₀) U_r, s = alpha / rank, L_r = L[:, :rank], U_r = U[:rank], z₀ = D[:rank]. Only z
    [rank] trains, from z₀ (the authors' SKDDJ/LoLDU): the paper's W_res = W − s·P L_r diag(z₀) U_r plus
    s·P L_r diag(z) U_r, in the delta form that leaves the base intact, so the initial function is the base's.
    P L_r and U_r are frozen, part of the job's state. Exported exactly as a plain LoRA of the same rank:
    A = U_r, B = P L_r diag(z − z₀), alpha as here."""

    type: ClassVar[str] = "loldu"
    peft_types: ClassVar[tuple[str, ...]] = ()
    alpha: float = 16.0
    """Scale numerator: the update is multiplied by alpha / rank (the authors' scaling_factor, kept fixed)."""

    def check_model(self, shapes: dict[str, tuple[int, int]]) -> None:
        for target, (out, inp) in shapes.items():
            if self.rank > min(out, inp):
                raise ValueError(f"adapter.rank={self.rank}: LoLDU keeps rank columns of L and rows of U from the LU "
                                 f"of {target}'s {out}×{inp} weight, which has {min(out, inp)}; "
                                 f"use rank ≤ {min(out, inp)}")

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> AdapterConfig | None:
        return None  # exported as a plain LoRA: it reads back as one

    def export_config(self) -> AdapterConfig:
        return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                          target_modules=list(self.target_modules))
