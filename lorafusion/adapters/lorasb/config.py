"""LoRA-SB (Ponkshe et al. 2024, arXiv 2411.19557): LoRA whose only trainable tensor is an r×r matrix R between
frozen factors initialised from the job's gradient."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lorafusion.adapters.base import AdapterConfig
from lorafusion.adapters.lora import LoRAConfig
from lorafusion.validation import check_positive_int, check_positive_number

__all__ = ["LoRASBConfig"]


@dataclass(kw_only=True)
class LoRASBConfig(LoRAConfig):
    """ΔW = s·B R A with s = alpha / rank; only R [rank, rank] trains, A [rank, in] and B [out, rank] are frozen.

    Before the job's first step a pre-pass sums the gradient G of each adapted weight over `init_batches` global
    batches of the job's data. ΔW_approx = −init_scale·sign(G) approximates the first step of full fine-tuning
    (sign: Adam's first update); its truncated SVD U S Vᵀ (rank r) gives B = U, A = Vᵀ (orthonormal, frozen) and
    R₀ = diag(S) / s, so s·B R₀ A = trunc_r(ΔW_approx). The base weight is not modified: training starts from
    W + trunc_r(ΔW_approx), as the authors' code does. The init depends on the gradient and this config only, so
    jobs with the same gradient and config get the same A, B, R₀ (Fed-SB's clients share A and B).
    Exported as the equivalent plain LoRA of the same rank: A' = R A, B' = B, lora_alpha = alpha."""

    type: ClassVar[str] = "lorasb"
    peft_types: ClassVar[tuple[str, ...]] = ()
    alpha: float | None = None
    """Scale numerator, s = alpha / rank. None (the default): alpha = rank, so s = 1, which the authors fix (they
    call the method free of this hyper-parameter). Under Adam, s scales how far each step moves ΔW; the init does
    not depend on it."""
    init_batches: int = 8
    """Global batches of the job's data whose summed gradient initialises A, B and R (the job's first ones, at most
    as many as it trains on)."""
    init_scale: float = 1e-6
    """η_eff of ΔW_approx = −η_eff·sign(G): the entry size of the full fine-tuning step the init approximates. The
    authors use the learning rate of their first warmup step, lr / (warmup_ratio·total steps) (1e-4 / ~330 ≈ 3e-7
    in their arithmetic runs); 1e-6 is that of lr 1e-4 with 100 warmup steps. It sets R₀ = diag(S) / s (S grows
    with init_scale), i.e. how far from W training starts; A and B do not depend on it."""

    def __post_init__(self) -> None:
        if self.alpha is None and isinstance(self.rank, int):
            self.alpha = float(self.rank)  # s = 1, the authors' setting (a bad rank is named below)
        elif self.alpha is not None:
            check_positive_number("adapter.alpha", self.alpha, "null (alpha = rank)")
        super().__post_init__()
        check_positive_int("adapter.init_batches", self.init_batches, "8")
        check_positive_number("adapter.init_scale", self.init_scale, "1e-6")

    @property
    def init_pass_batches(self) -> int:
        return self.init_batches

    def check_model(self, shapes: dict[str, tuple[int, int]]) -> None:
        for target, (out, inp) in shapes.items():
            if self.rank > min(out, inp):
                raise ValueError(f"adapter.rank={self.rank}: LoRA-SB takes rank singular vectors of {target}'s "
                                 f"{out}×{inp} gradient; use rank ≤ {min(out, inp)}")

    def export_config(self) -> AdapterConfig:
        return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                          target_modules=list(self.target_modules))
