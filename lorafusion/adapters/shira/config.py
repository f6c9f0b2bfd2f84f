"""SHiRA (Bhardwaj et al. 2024): a sparse high-rank ΔW on a fixed random support; PEFT's ShiraConfig."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lorafusion.adapters.base import AdapterConfig
from lorafusion.adapters.peft_format import peft_number, peft_targets, reject_unsupported
from lorafusion.validation import check_seed

__all__ = ["SHiRAConfig"]


@dataclass(kw_only=True)
class SHiRAConfig(AdapterConfig):
    """ΔW is zero except on rank·(in + out) entries per module (as many as a rank-`rank` LoRA trains), chosen
    by PEFT's random mask from mask_seed; those entries train, starting at 0. No scaling, no dropout."""

    type: ClassVar[str] = "shira"
    peft_types: ClassVar[tuple[str, ...]] = ("SHIRA",)
    rank: int = 32
    """PEFT's r: each module trains rank·(in_features + out_features) entries of ΔW."""
    mask_seed: int | None = None
    """Seed of the support (PEFT's random_seed); None = PEFT's default, torch's default generator seed."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_seed("adapter.mask_seed", self.mask_seed, optional=True)

    def check_model(self, shapes: dict[str, tuple[int, int]]) -> None:
        for target, (out, inp) in shapes.items():
            if self.rank * (out + inp) > out * inp:
                raise ValueError(f"adapter.rank={self.rank}: SHiRA would train rank·(in+out) = "
                                 f"{self.rank * (out + inp)} entries of {target}, which has only {out}×{inp} = "
                                 f"{out * inp}; use rank ≤ {out * inp // (out + inp)}")

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> AdapterConfig | None:
        if data.get("peft_type") != "SHIRA":
            return None
        reject_unsupported(data, where, {"mask_type": "random"})
        seed = data.get("random_seed")
        return cls(rank=int(peft_number(data, "r", where)), mask_seed=None if seed is None else int(seed),
                   target_modules=peft_targets(data, where))

    def peft_config(self) -> dict[str, Any]:
        return {"peft_type": "SHIRA", "r": self.rank, "mask_type": "random", "random_seed": self.mask_seed,
                "init_weights": True, "target_modules": list(self.target_modules), "fan_in_fan_out": False}
