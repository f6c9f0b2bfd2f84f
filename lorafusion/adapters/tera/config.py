"""TeRA (Gu et al. 2025, arXiv 2509.03234): a tensorised, high-rank ΔW of frozen random factors shared across
layers; only per-layer diagonal scaling vectors train."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lorafusion.adapters.base import AdapterConfig
from lorafusion.adapters.lora import LoRAConfig

__all__ = ["TeRAConfig"]


@dataclass(kw_only=True)
class TeRAConfig(AdapterConfig):
    """ΔW [N, K], N = n₁n₂ and K = k₁k₂ (each split into its two most balanced factors), viewed as a tensor
    [n₁, n₂, k₁, k₂] with the Tucker form
        ΔW = c · G ×₁ (U₁ diag(λ₁)) ×₂ (U₂ diag(λ₂)) ×₃ (U₃ diag(λ₃)) ×₄ (U₄ diag(λ₄)),   c = 1/√K,
    core G [r₁, r₂, r₃, r₄] ~ N(0, 1) and factors U_m [I_m, r_m] ~ N(0, 1/r_m), r_m = min(rank, I_m): frozen, drawn
    from projection_seed once per module shape and shared by every layer (and every module of that shape). Only
    the λ_m [r_m] train: λ₁ from 0 (so ΔW = 0 at init, as VeRA's λ_b), the others from 1; at most 4·rank values
    per module for rank(ΔW) up to min(r₁r₂, r₃r₄). c makes the entries' variance 1/K when every λ is 1.

    [GUESS] The abstract (the authors' guyuxuan9/TeRA was not retrievable) says: tensorised ΔW, a Tucker-like
    network, large random factors frozen and shared across layers, layer-specific diagonal factor matrices trained.
    The order (4), the split and the scales above are our choices: order 4 is the smallest that gives a rank
    beyond the scaling vectors' size (r² against 4r), and sharing by shape keeps one set of factors per module
    kind as the abstract describes.

    Computed by forward_delta (a high-rank ΔW has no low-rank factors). No PEFT adapter holds it exactly: the
    export is our native format (the λ's; the factors regenerate from projection_seed) and, for PEFT, the
    truncated-SVD LoRA of rank export_rank, whose relative error per module is reported."""

    type: ClassVar[str] = "tera"
    peft_types: ClassVar[tuple[str, ...]] = ()
    rank: int = 16
    """Tucker rank of each of the four modes (capped at the mode's size): ΔW's rank can reach rank²."""
    projection_seed: int = 0
    """Seed of the frozen core and factors shared by all the job's layers."""
    export_rank: int = 16
    """Rank of the truncated-SVD plain LoRA exported for PEFT beside the native tensors (at most every target's
    min(out, in)); its relative error per module goes to the adapter's export_report.json."""

    @property
    def svd_export_rank(self) -> int:
        return self.export_rank

    def check_model(self, shapes: dict[str, tuple[int, int]]) -> None:
        for target, (out, inp) in shapes.items():
            if self.export_rank > min(out, inp):
                raise ValueError(f"adapter.export_rank={self.export_rank}: {target}'s {out}×{inp} update has at most "
                                 f"{min(out, inp)} singular values; use export_rank ≤ {min(out, inp)}")

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> AdapterConfig | None:
        return None  # the PEFT files hold the truncated LoRA; the native files name this config

    def export_config(self) -> AdapterConfig:
        return LoRAConfig(rank=self.export_rank, alpha=float(self.export_rank),
                          target_modules=list(self.target_modules))
