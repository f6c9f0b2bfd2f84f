"""LoRA-GA (Wang et al. 2024): LoRA initialised from the gradient of the base weight, so that its first steps
follow the full fine-tuning gradient's best rank-2r approximation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorafusion.adapters.base import AdapterConfig
from lorafusion.adapters.lora import LoRAConfig
from lorafusion.validation import check_positive_int, check_positive_number

__all__ = ["LoRAGAConfig"]


@dataclass(kw_only=True)
class LoRAGAConfig(LoRAConfig):
    """Before the job's first step a pre-pass sums the gradient G of each adapted weight over `init_batches`
    global batches of the job's data; then, with G ≈ U S Vᵀ and ζ = out^¼ / √stable_gamma (the authors' init,
    not PEFT's, which multiplies B by the singular values): B₀ = U[:, r:2r]·ζ, A₀ = Vᵀ[:r]·ζ. A and B train
    from (A₀, B₀); the base stays intact through a frozen −s·B₀A₀ term, so ΔW = s·(B A − B₀ A₀) is 0 at init.
    Exported as the equivalent plain LoRA of rank 2·rank ([A; A₀], [B, −B₀], alpha 2·alpha) on the unmodified
    base model."""

    type: ClassVar[str] = "loraga"
    peft_types: ClassVar[tuple[str, ...]] = ()
    init_batches: int = 8
    """Global batches of the job's data whose summed gradient initialises A and B (the job's first ones, at most
    as many as it trains on)."""
    stable_gamma: float = 16.0
    """γ of the authors' 'stable' scale ζ = out^¼ / √γ."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("adapter.init_batches", self.init_batches, "8")
        check_positive_number("adapter.stable_gamma", self.stable_gamma, "16")

    @property
    def init_pass_batches(self) -> int:
        return self.init_batches

    def check_model(self, shapes: dict[str, tuple[int, int]]) -> None:
        for target, (out, inp) in shapes.items():
            if 2 * self.rank > min(out, inp):
                raise ValueError(f"adapter.rank={self.rank}: LoRA-GA takes 2·rank = {2 * self.rank} singular vectors "
                                 f"of {target}'s {out}×{inp} gradient; use rank ≤ {min(out, inp) // 2}")

    def export_config(self) -> AdapterConfig:
        return LoRAConfig(rank=2 * self.rank, alpha=2 * self.alpha, dropout=self.dropout,
                          target_modules=list(self.target_modules))
