"""RMSNorm as one autograd node, in megatron's norm slots (the decoder layers' two and the final one).

megatron's local spec builds `torch.nn.RMSNorm`, whose CPU forward is a chain of elementwise ops (square, mean, add,
rsqrt, two products) that autograd differentiates op by op: about a dozen passes over [tokens, hidden] in the
backward. This node computes the same forward (the same ops in the same order and precision, so the same bits) and
a backward written out: dx = rstd · (g − x̂ · mean(g · x̂)) with g = dy · w and x̂ = x · rstd, in four passes, and the
weight's gradient Σ dy · x̂ only when the weight trains.
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
    `TransformerBlockSubmodules.layer_norm`): built as `RMSNorm(config=..., hidden_size=..., eps=...)`."""

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-6, **_unused) -> None:
        super().__init__()
        dtype = getattr(config, "params_dtype", torch.float32) if config is not None else torch.float32
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
