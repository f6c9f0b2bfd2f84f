"""VeRA (Kopiczko et al. 2024): shared frozen random projections, trainable scaling vectors; PEFT's VeraConfig."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lorafusion.adapters.base import AdapterConfig
from lorafusion.adapters.peft_format import peft_number, peft_targets, reject_unsupported
from lorafusion.validation import is_number

__all__ = ["VeRAConfig"]


@dataclass(kw_only=True)
class VeRAConfig(AdapterConfig):
    """ΔW = diag(λ_b) B_s diag(λ_d) A_s with A_s, B_s slices of one pair of frozen random projections per job
    (generated from projection_seed exactly as PEFT does); λ_b [out] starts at 0, λ_d [rank] at d_initial."""

    type: ClassVar[str] = "vera"
    peft_types: ClassVar[tuple[str, ...]] = ("VERA",)
    rank: int = 256
    """Rank of the shared projections (VeRA uses large ranks: only rank + out values train per module)."""
    d_initial: float = 0.1
    """Initial value of every λ_d entry."""
    projection_seed: int = 0
    """Seed of the shared projections (PEFT's projection_prng_key)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input, in [0, 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not is_number(self.d_initial):
            raise ValueError(f"adapter.d_initial={self.d_initial!r} must be a number, e.g. d_initial: 0.1")

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> AdapterConfig | None:
        if data.get("peft_type") != "VERA":
            return None
        reject_unsupported(data, where)
        return cls(rank=int(peft_number(data, "r", where)), d_initial=float(peft_number(data, "d_initial", where, 0.1)),
                   projection_seed=int(peft_number(data, "projection_prng_key", where, 0)),
                   dropout=float(peft_number(data, "vera_dropout", where, 0.0)), target_modules=peft_targets(data, where))

    def peft_config(self) -> dict[str, Any]:
        return {"peft_type": "VERA", "r": self.rank, "projection_prng_key": self.projection_seed,
                "save_projection": True, "vera_dropout": self.dropout, "d_initial": self.d_initial,
                "target_modules": list(self.target_modules), "bias": "none", "fan_in_fan_out": False,
                "init_weights": True}
