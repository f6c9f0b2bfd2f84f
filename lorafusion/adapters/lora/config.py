"""LoRA (Hu et al. 2021) and rsLoRA (Kalajdzievski 2023) configurations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from lorafusion.adapters.base import AdapterConfig
from lorafusion.adapters.peft_format import peft_number, peft_targets, reject_unsupported

__all__ = ["LoRAConfig", "RsLoRAConfig", "read_lora_fields"]


def read_lora_fields(data: dict[str, Any], where: str) -> dict[str, Any]:
    """rank, alpha, dropout and target_modules of a PEFT LoraConfig, after rejecting what we do not implement."""
    reject_unsupported(data, where)
    if data.get("init_lora_weights") == "lora_ga":
        raise ValueError(f"{where}: init_lora_weights='lora_ga' marks a raw LoRA-GA adapter, which is only correct "
                         "on a base model PEFT modified in place; export it with PEFT's "
                         "path_initial_model_for_weight_conversion (a plain rank-2r LoRA) and load that")
    return {"rank": int(peft_number(data, "r", where)), "alpha": float(peft_number(data, "lora_alpha", where)),
            "dropout": float(peft_number(data, "lora_dropout", where, 0.0)),
            "target_modules": peft_targets(data, where)}


@dataclass(kw_only=True)
class LoRAConfig(AdapterConfig):
    """ΔW = (alpha / rank) · B A, A [rank, in] Kaiming-uniform, B [out, rank] zero (PEFT's init)."""

    type: ClassVar[str] = "lora"
    peft_types: ClassVar[tuple[str, ...]] = ("LORA",)
    rank: int = 16
    """Inner dimension r of A and B (≥ 1)."""
    alpha: float = 32.0
    """Scale numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout probability on the adapter's input, in [0, 1)."""

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> AdapterConfig | None:
        if cls not in (LoRAConfig, RsLoRAConfig):  # variants built on LoRA export as plain LoRA and read back as one
            return None
        if data.get("peft_type") != "LORA" or data.get("use_dora") or bool(data.get("use_rslora")) != (cls is RsLoRAConfig):
            return None
        return cls(**read_lora_fields(data, where))

    def peft_config(self) -> dict[str, Any]:
        if self.export_config() is not self:  # LoRA-GA, Hydra, ...: the config of the LoRA they export as
            return super().peft_config()
        return {
            "peft_type": "LORA",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.type == "rslora",
            "use_dora": False,
            "target_modules": list(self.target_modules),
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
        }


@dataclass(kw_only=True)
class RsLoRAConfig(LoRAConfig):
    """Rank-stabilised LoRA: the update is scaled by alpha / sqrt(rank) instead of alpha / rank."""

    type: ClassVar[str] = "rslora"

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank)
