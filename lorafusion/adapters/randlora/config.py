"""RandLoRA (Albert et al. 2025): full-rank updates from shared frozen random bases with trainable diagonal
scalings; PEFT's RandLoraConfig."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lorafusion.adapters.base import AdapterConfig
from lorafusion.adapters.peft_format import peft_number, peft_targets, reject_unsupported

__all__ = ["RandLoRAConfig"]


@dataclass(kw_only=True)
class RandLoRAConfig(AdapterConfig):
    """ΔW = (alpha / rank) · Σ_b B_b diag(λ_b) A diag(γ_b) over ⌈min(in, out) / rank⌉ random bases of rank `rank`
    shared by the job's modules (PEFT's flattening and pairing order); λ starts at 0, γ at 1/max(bases, min dim)."""

    type: ClassVar[str] = "randlora"
    peft_types: ClassVar[tuple[str, ...]] = ("RANDLORA",)
    rank: int = 32
    """Rank of each random basis (PEFT's r); fewer, larger bases train fewer parameters."""
    alpha: float = 640.0
    """Scale numerator: the update is multiplied by alpha / rank (PEFT's randlora_alpha)."""
    projection_seed: int = 0
    """Seed of the shared bases (PEFT's projection_prng_key)."""
    sparse: bool = False
    """Ternary sparse bases (values −1, 0, 1 with sparsity 1/3, then normalised) instead of dense ones."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input, in [0, 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.sparse, bool):
            raise ValueError(f"adapter.sparse={self.sparse!r} must be true or false")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> AdapterConfig | None:
        if data.get("peft_type") != "RANDLORA":
            return None
        reject_unsupported(data, where, {"very_sparse": False})
        return cls(rank=int(peft_number(data, "r", where)), alpha=float(peft_number(data, "randlora_alpha", where, 640)),
                   projection_seed=int(peft_number(data, "projection_prng_key", where, 0)),
                   sparse=bool(data.get("sparse", False)), dropout=float(peft_number(data, "randlora_dropout", where, 0.0)),
                   target_modules=peft_targets(data, where))

    def peft_config(self) -> dict[str, Any]:
        return {"peft_type": "RANDLORA", "r": self.rank, "randlora_alpha": self.alpha,
                "projection_prng_key": self.projection_seed, "save_projection": True, "sparse": self.sparse,
                "very_sparse": False, "randlora_dropout": self.dropout, "init_weights": True,
                "target_modules": list(self.target_modules), "bias": "none", "fan_in_fan_out": False}
