"""Uni-LoRA (Li et al. 2025): every LoRA entry of the job is one entry of a single trainable vector θ; PEFT's
UniLoraConfig."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lorafusion.adapters.base import AdapterConfig
from lorafusion.adapters.peft_format import peft_number, peft_targets, reject_unsupported
from lorafusion.validation import check_positive_int, check_positive_number

__all__ = ["UniLoRAConfig"]


@dataclass(kw_only=True)
class UniLoRAConfig(AdapterConfig):
    """A = θ[idx_A]·s_A [rank, in], B = θ[idx_B]·s_B [out, rank], ΔW = B A (no scaling): a fixed random index
    map (from projection_seed, PEFT's balanced assignment over all adapted modules in model order) and
    s = 1/√(uses of that θ entry), so ‖θ‖ equals the norm of all the A's and B's together."""

    type: ClassVar[str] = "unilora"
    peft_types: ClassVar[tuple[str, ...]] = ("UNILORA",)
    rank: int = 4
    """Rank r of every module's A and B."""
    theta_dim: int = 256
    """Length of the job's one trainable vector θ (PEFT's theta_d_length); entries beyond the job's LoRA entry count
    (layers × Σ rank·(in + out)) are never used, as in PEFT."""
    projection_seed: int = 42
    """Seed of the index map (PEFT's proj_seed)."""
    init_bound: float = 0.02
    """θ starts uniform in [−init_bound, init_bound] (PEFT's init_theta_d_bound)."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input, in [0, 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("adapter.theta_dim", self.theta_dim, "256")
        check_positive_number("adapter.init_bound", self.init_bound, "0.02")

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> AdapterConfig | None:
        if data.get("peft_type") != "UNILORA":
            return None
        reject_unsupported(data, where)
        if data.get("init_weights", True) is not True:
            raise ValueError(f"{where}: init_weights={data['init_weights']!r} is not supported (only True)")
        return cls(rank=int(peft_number(data, "r", where)), theta_dim=int(peft_number(data, "theta_d_length", where)),
                   projection_seed=int(peft_number(data, "proj_seed", where, 42)),
                   init_bound=float(peft_number(data, "init_theta_d_bound", where, 0.02)),
                   dropout=float(peft_number(data, "unilora_dropout", where, 0.0)),
                   target_modules=peft_targets(data, where))

    def peft_config(self) -> dict[str, Any]:
        return {"peft_type": "UNILORA", "r": self.rank, "theta_d_length": self.theta_dim,
                "proj_seed": self.projection_seed, "init_theta_d_bound": self.init_bound,
                "unilora_dropout": self.dropout, "save_indices": False, "init_weights": True,
                "target_modules": list(self.target_modules), "bias": "none", "fan_in_fan_out": False}
