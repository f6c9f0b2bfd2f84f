"""LoRA's per-job layer: two factors, Kaiming-uniform A and zero B, as PEFT initialises them."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorafusion.adapters.base import AdapterLayer
from lorafusion.adapters.lora.config import LoRAConfig

__all__ = ["LoRALayer", "kaiming_a"]


def kaiming_a(rank: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """A [rank, in] as PEFT draws it: Kaiming-uniform with a=sqrt(5) (nn.Linear's default), bound 1/sqrt(in)."""
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound


class LoRALayer(AdapterLayer):
    def __init__(self, config: LoRAConfig, in_features: int, out_features: int, *, generator: torch.Generator,
                 **context) -> None:
        super().__init__(config, in_features, out_features, generator=generator, **context)
        self.lora_A = nn.Parameter(kaiming_a(config.rank, in_features, generator))  # [r, K]
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.rank))  # [N, r]

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A, self.lora_B, self.config.scaling

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A.detach(), "lora_B.weight": self.lora_B.detach()}
