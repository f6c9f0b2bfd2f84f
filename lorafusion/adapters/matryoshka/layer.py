"""MatryoshkaLoRA's per-module factors: A scaled per component by the fixed diagonal P of the training form, or the
export rank's leading components at evaluation."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorafusion.adapters.base import AdapterLayer
from lorafusion.adapters.matryoshka.config import MatryoshkaLoRAConfig

__all__ = ["MatryoshkaLoRALayer", "nested_weights"]


def nested_weights(config: MatryoshkaLoRAConfig) -> torch.Tensor:
    """P [rank]: P[i] = Σ_{t ∈ train_ranks, t > i} scale(t), so B diag(P) A = Σ_t scale(t) · B[:, :t] A[:t]."""
    return torch.tensor([sum(config.scale_of(t) for t in config.train_ranks if t > i) for i in range(config.rank)])


class MatryoshkaLoRALayer(AdapterLayer):
    def __init__(self, config: MatryoshkaLoRAConfig, in_features: int, out_features: int, *,
                 generator: torch.Generator, **context) -> None:
        super().__init__(config, in_features, out_features, generator=generator, **context)
        r = config.rank
        bound = 1.0 / math.sqrt(r)  # the authors' Kaiming-uniform (a = √5) of A [in, r]: fan-in r
        self.lora_A = nn.Parameter((torch.rand(r, in_features, generator=generator) * 2 - 1) * bound)  # [r, K]
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))  # [N, r]
        self.register_buffer("weights", nested_weights(config), persistent=False)  # [r]: P

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """In training (P ⊙ A, B, 1): the sum of the nested sub-adapters. At evaluation, the exported LoRA's: the
        first export_rank components, scale(export_rank)."""
        if not self.training:
            t = self.config.export_rank
            return self.lora_A[:t], self.lora_B[:, :t], self.config.export_config().scaling
        return self.lora_A * self.weights[:, None], self.lora_B, 1.0

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        t = self.config.export_rank
        return {"lora_A.weight": self.lora_A.detach()[:t], "lora_B.weight": self.lora_B.detach()[:, :t]}
