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
        if "lora_A_fold" in self._parameters:  # a FLoRA client: its group's folded rounds ride along, frozen
            return (torch.cat([self.lora_A, self.lora_A_fold]), torch.cat([self.lora_B, self.lora_B_fold], dim=1),
                    self.config.scaling)
        return self.lora_A, self.lora_B, self.config.scaling

    def set_fold(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Make (a [m, K], b [N, m]) a frozen offset added to this adapter: ΔW = s·(B A + b a). FLoRA's rounds
        folded so far (see lorafusion.federation), with b divided by this layer's scale s. Frozen parameters, so
        the job's checkpoint holds them and its cached factors are rebuilt."""
        self.lora_A_fold = nn.Parameter(a.detach().clone(), requires_grad=False)
        self.lora_B_fold = nn.Parameter(b.detach().clone(), requires_grad=False)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A.detach(), "lora_B.weight": self.lora_B.detach()}
