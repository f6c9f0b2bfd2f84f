"""LoRA's per-job layer: two factors, Kaiming-uniform A and zero B, as PEFT initialises them."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorafusion.adapters.base import AdapterLayer
from lorafusion.adapters.lora.config import LoRAConfig

__all__ = ["LoRALayer", "lora_peft_config"]


class LoRALayer(AdapterLayer):
    def __init__(self, config: LoRAConfig, in_features: int, out_features: int, *, generator: torch.Generator) -> None:
        super().__init__()
        self.config = config
        # Kaiming-uniform with a=sqrt(5) (nn.Linear's and PEFT's default) has bound 1/sqrt(fan_in).
        bound = 1.0 / math.sqrt(in_features)
        a = (torch.rand(config.rank, in_features, generator=generator) * 2 - 1) * bound
        self.lora_A = nn.Parameter(a)  # [r, K]
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.rank))  # [N, r]

    @property
    def dropout_p(self) -> float:
        return float(self.config.dropout)

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A, self.lora_B, self.config.scaling

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A.detach(), "lora_B.weight": self.lora_B.detach()}

    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.lora_A.copy_(tensors["lora_A.weight"])
            self.lora_B.copy_(tensors["lora_B.weight"])


def lora_peft_config(config: LoRAConfig) -> dict:
    """PEFT's LoraConfig fields for an exported LoRA / rsLoRA adapter."""
    return {
        "peft_type": "LORA",
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.type == "rslora",
        "target_modules": list(config.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
    }
