"""LoRA-SB's per-job layer: a gradient probe during the init pre-pass, then frozen A, B around a trainable R."""

from __future__ import annotations

import torch
from torch import nn

from lorafusion.adapters.init_pass import GradientInitLayer, top_singular
from lorafusion.adapters.lorasb.config import LoRASBConfig

__all__ = ["LoRASBLayer", "sign_gradient_init"]


def sign_gradient_init(grad: torch.Tensor, config: LoRASBConfig,
                       seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [r, K], B [N, r], R₀ [r, r]) of LoRA-SB's init from the summed gradient G [N, K]: with
    ΔW_approx = −init_scale·sign(G) ≈ U S Vᵀ truncated to rank r, A = Vᵀ, B = U, R₀ = diag(S) / s, so that
    s·B R₀ A = trunc_r(ΔW_approx). Deterministic in (G, config, seed) (see init_pass.top_singular)."""
    approx = -config.init_scale * torch.sign(grad.float())  # [N, K]
    u, s, vh = top_singular(approx, config.rank, seed)
    return vh, u, torch.diag(s / config.scaling)


class LoRASBLayer(GradientInitLayer):
    """Trainable `lorasb_R` [r, r]; frozen `lorasb_A` [r, K] and `lorasb_B` [N, r], parameters that do not train
    but are part of the job's state (checkpoints hold them: only the init pass computes them)."""

    def __init__(self, config: LoRASBConfig, in_features: int, out_features: int, *, generator: torch.Generator,
                 **context) -> None:
        super().__init__(config, in_features, out_features, generator=generator, **context)
        r = config.rank
        self.lorasb_A = nn.Parameter(torch.zeros(r, in_features), requires_grad=False)  # [r, K]
        self.lorasb_B = nn.Parameter(torch.zeros(out_features, r), requires_grad=False)  # [N, r]
        self.lorasb_R = nn.Parameter(torch.zeros(r, r))  # [r, r]

    def init_from_gradient(self, grad: torch.Tensor) -> None:
        a, b, r0 = sign_gradient_init(grad, self.config, self.seed)
        for param, value in ((self.lorasb_A, a), (self.lorasb_B, b), (self.lorasb_R, r0)):
            param.copy_(value)

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lorasb_R @ self.lorasb_A, self.lorasb_B, self.config.scaling  # R A [r, K]: R's gradient is dA'·Aᵀ

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        a, b, _ = self.effective_factors()
        return {"lora_A.weight": a.detach(), "lora_B.weight": b.detach()}
