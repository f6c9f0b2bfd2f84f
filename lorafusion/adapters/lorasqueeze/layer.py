"""The annealed LoRA-Squeeze layer: LoRA's factors, re-factorised by truncated SVD at the steps that lower the
scheduled rank (see LoRASqueezeConfig)."""

from __future__ import annotations

import torch
from torch import nn

from lorafusion.adapters.lora import LoRALayer
from lorafusion.adapters.lorasqueeze.config import LoRASqueezeConfig
from lorafusion.adapters.svd import factor_svd

__all__ = ["LoRASqueezeLayer"]


class LoRASqueezeLayer(LoRALayer):
    config: LoRASqueezeConfig

    def after_step(self, step: int) -> list[nn.Parameter]:
        """Re-factorise at the scheduled rank when step `step` lowered it; returns the parameters whose optimizer
        state must be reset (none on the other steps)."""
        rank = self.config.rank_at(step)
        if rank >= self.config.rank_at(step - 1):
            return []
        a, b = self.squeezed_factors(rank)
        with torch.no_grad():
            self.lora_A.copy_(a)
            self.lora_B.copy_(b)
        return [self.lora_A, self.lora_B]

    def squeezed_factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [rank_src, K], B [N, rank_src]) whose s·B A is the rank-`rank` truncated SVD of the current s·B A,
        the singular values split evenly between the factors, zero beyond `rank`."""
        s = self.config.scaling
        u, sigma, vh = factor_svd(self.lora_A.detach(), self.lora_B.detach(), s, rank)  # [N, t], [t], [t, K]
        root = (sigma / s).sqrt()  # [t]
        a, b = torch.zeros_like(self.lora_A), torch.zeros_like(self.lora_B)
        a[:sigma.shape[0]] = root[:, None] * vh
        b[:, :sigma.shape[0]] = u * root
        return a, b

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """A plain LoRA of target_rank at the same scale: the leading factors once the schedule has reached
        target_rank (exact), else the truncated SVD of ΔW (the job stopped before squeeze_end_step)."""
        t = self.config.target_rank
        a, b = self.lora_A.detach(), self.lora_B.detach()
        if a[t:].count_nonzero() or b[:, t:].count_nonzero():
            a, b = self.squeezed_factors(t)
        return {"lora_A.weight": a[:t], "lora_B.weight": b[:, :t]}
