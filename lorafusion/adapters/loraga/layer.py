"""LoRA-GA's per-job layer: a gradient probe during the init pre-pass, then LoRA factors with a frozen offset."""

from __future__ import annotations

import torch
from torch import nn

from lorafusion.adapters.init_pass import GradientInitLayer, top_singular
from lorafusion.adapters.loraga.config import LoRAGAConfig

__all__ = ["LoRAGALayer", "gradient_init"]


def gradient_init(grad: torch.Tensor, rank: int, gamma: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀ [r, K], B₀ [N, r]) of the authors' LoRA-GA init from the gradient G [N, K]: Vᵀ[:r]·ζ and U[:, r:2r]·ζ,
    ζ = N^¼ / √γ, from G's top 2r singular vectors (deterministic: see init_pass.top_singular)."""
    u, _, vh = top_singular(grad, 2 * rank, seed)
    zeta = grad.shape[0] ** 0.25 / gamma ** 0.5
    return (vh[:rank] * zeta).float(), (u[:, rank:2 * rank] * zeta).float()


class LoRAGALayer(GradientInitLayer):
    def __init__(self, config: LoRAGAConfig, in_features: int, out_features: int, *, generator: torch.Generator,
                 **context) -> None:
        super().__init__(config, in_features, out_features, generator=generator, **context)
        r = config.rank
        self.lora_A = nn.Parameter(torch.zeros(r, in_features))  # [r, K], A₀ after the init pass
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))  # [N, r], B₀ after the init pass
        self.lora_A0 = nn.Parameter(torch.zeros(r, in_features), requires_grad=False)  # frozen offset
        self.lora_B0 = nn.Parameter(torch.zeros(out_features, r), requires_grad=False)

    def init_from_gradient(self, grad: torch.Tensor) -> None:
        """A = A₀, B = B₀ from the gradient (ΔW = 0 at init)."""
        a0, b0 = gradient_init(grad, self.config.rank, self.config.stable_gamma, self.seed)
        for param, value in ((self.lora_A, a0), (self.lora_B, b0), (self.lora_A0, a0), (self.lora_B0, b0)):
            param.copy_(value)

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return (torch.cat([self.lora_A, self.lora_A0]), torch.cat([self.lora_B, -self.lora_B0], dim=1),
                self.config.scaling)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        a, b, _ = self.effective_factors()
        return {"lora_A.weight": a.detach(), "lora_B.weight": b.detach()}
