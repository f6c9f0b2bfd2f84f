"""Hydra's per-job layer: its two branches folded into one pair of effective factors of rank 2r."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorafusion.adapters.base import AdapterLayer, BaseView
from lorafusion.adapters.hydra.config import HydraConfig

__all__ = ["HydraLayer", "xavier_uniform"]


def xavier_uniform(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, cols] drawn as nn.init.xavier_uniform_ draws a Linear weight: U(±√(6 / (rows + cols)))."""
    bound = math.sqrt(6.0 / (rows + cols))
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound


class HydraLayer(AdapterLayer):
    def __init__(self, config: HydraConfig, in_features: int, out_features: int, *, generator: torch.Generator,
                 base: BaseView, **context) -> None:
        super().__init__(config, in_features, out_features, generator=generator, base=base, **context)
        r = config.rank
        self.hydra_A_p = nn.Parameter(xavier_uniform(r, in_features, generator))  # [r, K], on x
        self.hydra_A_s = nn.Parameter(xavier_uniform(r, out_features, generator))  # [r, N], on W x
        self.hydra_B_p = nn.Parameter(torch.zeros(out_features, r))  # [N, r]
        self.hydra_B_s = nn.Parameter(torch.zeros(out_features, r))  # [N, r]

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """A = [A_p; A_s W] [2r, K], B = [B_p, B_s] [N, 2r]: built once per optimizer step like every factor, so
        the sequential branch costs one r×N×K product per step, not per microbatch."""
        a_seq = self.hydra_A_s @ self.base.weight().to(self.hydra_A_s.dtype)  # [r, K]
        return (torch.cat([self.hydra_A_p, a_seq]), torch.cat([self.hydra_B_p, self.hydra_B_s], dim=1),
                self.config.scaling)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        a, b, _ = self.effective_factors()
        return {"lora_A.weight": a.detach(), "lora_B.weight": b.detach()}
