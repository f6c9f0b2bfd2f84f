"""Block-LoRA's per-module factors: one shared down-projection block and `blocks` up-projection blocks."""

from __future__ import annotations

import torch
from torch import nn

from lorafusion.adapters.base import AdapterLayer
from lorafusion.adapters.blocklora.config import BlockLoRAConfig
from lorafusion.adapters.lora import kaiming_a

__all__ = ["BlockLoRALayer"]


class BlockLoRALayer(AdapterLayer):
    def __init__(self, config: BlockLoRAConfig, in_features: int, out_features: int, *, generator: torch.Generator,
                 **context) -> None:
        super().__init__(config, in_features, out_features, generator=generator, **context)
        r = config.block_rank
        self.lora_A = nn.Parameter(kaiming_a(r, in_features, generator))  # [r/n, K]: the shared A_s
        self.lora_B = nn.Parameter(torch.zeros(config.blocks, out_features, r))  # [n, N, r/n]: the B_i

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A, self.lora_B.sum(0), self.config.scaling  # Σ_i B_i A_s at rank r/n

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A.detach(), "lora_B.weight": self.lora_B.detach().sum(0)}
