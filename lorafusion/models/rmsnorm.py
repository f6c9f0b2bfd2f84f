"""RMSNorm as one autograd node, in megatron's norm slots (the decoder layers' two and the final one).

megatron's local spec builds `torch.nn.RMSNorm`, whose CPU forward is a chain of elementwise ops (square, mean, add,
rsqrt, two products) that autograd differentiates op by op. This node computes the same forward (the same ops in the
same order and precision, so the same bits) and a backward written out, dx = rstd · (g − x̂ · mean(g · x̂)) with
g = dy · w and x̂ = x · rstd, and the weight's gradient Σ dy · x̂ only when the weight trains (docs/hot_path.md).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm", "rms_norm"]

_UPCAST = (torch.bfloat16, torch.float16)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # torch's rms_norm: reduced precision computed in fp32, the weight's product included, then rounded once
        xf = x.float() if x.dtype in _UPCAST else x
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))  # [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).mul_(weight).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xf = x.float() if x.dtype in _UPCAST else x
        dyf = dy.float() if dy.dtype in _UPCAST else dy
        normed = xf * rstd  # x̂
        dx = dweight = None
        if ctx.needs_input_grad[0]:
            g = dyf * weight
            dx = (g - normed * (g * normed).mean(-1, keepdim=True)).mul_(rstd).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dweight = (dyf * normed).reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype)
        return dx, dweight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x², -1) + eps) · weight, over the last dimension."""
    return _RMSNormFunction.apply(x, weight, eps)


class RMSNorm(nn.Module):
    """megatron's norm slot (`TransformerLayerSubmodules.input_layernorm`, `pre_mlp_layernorm`,
    `TransformerBlockSubmodules.layer_norm`): built as `RMSNorm(config=..., hidden_size=..., eps=...)`, with the
    same refusals as megatron's torch norm for what it does not compute."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        if config.layernorm_zero_centered_gamma or config.sequence_parallel or config.normalization != "RMSNorm":
            raise ValueError("lorafusion's RMSNorm is a plain RMSNorm: it takes no zero-centred gamma and no "
                             f"sequence parallelism (config normalization={config.normalization!r}, "
                             f"layernorm_zero_centered_gamma={config.layernorm_zero_centered_gamma}, "
                             f"sequence_parallel={config.sequence_parallel})")
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
