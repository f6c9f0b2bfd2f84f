"""DoRA (Liu et al. 2024): weight-decomposed LoRA, PEFT's LoraConfig(use_dora=True)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lorafusion.adapters.base import AdapterConfig
from lorafusion.adapters.lora import LoRAConfig, read_lora_fields
from lorafusion.adapters.peft_format import reject_unsupported

__all__ = ["DoRAConfig"]


@dataclass(kw_only=True)
class DoRAConfig(LoRAConfig):
    """y = (m / ‖W + s·B A‖_row) ⊙ (W x + s·B A x) + bias, s = alpha / rank; the norm is detached (the paper's
    §4.3, as PEFT does), m [out] trains and starts at ‖W‖_row, A and B start as LoRA's."""

    type: ClassVar[str] = "dora"

    @classmethod
    def from_peft(cls, data: dict[str, Any], where: str) -> AdapterConfig | None:
        if data.get("peft_type") != "LORA" or not data.get("use_dora"):
            return None
        reject_unsupported(data, where, {"use_rslora": False})
        return cls(**read_lora_fields(data, where))

    def peft_config(self) -> dict[str, Any]:
        return {**super().peft_config(), "use_rslora": False, "use_dora": True}
